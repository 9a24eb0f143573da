import pytest
import torch

from sida.offload.model_loader import load_model
from sida.predictor.artifact import PredictorError, find_predictor, load_predictor, save_predictor
from sida.predictor.network import PredictorHash
from sida.predictor.traces import collect_traces
from sida.predictor.train import TrainConfig, hit_rates, tkd_loss, train
from tests.conftest import TINY_TEXTS


def test_tkd_is_zero_when_the_predictor_matches_the_router():
    probs = torch.tensor([[0.6, 0.3, 0.1, 0.0]])
    idx = probs.argsort(-1, descending=True)
    top = probs.gather(-1, idx)
    assert tkd_loss(probs.clamp(min=1e-12).log(), idx, top, 3).abs() < 1e-6
    assert tkd_loss(torch.zeros(1, 4), idx, top, 3) > 0.05


def test_training_learns_and_the_artifact_checks_its_model(tiny8_dir, tiny_dir, tmp_path):
    loaded = load_model(tiny8_dir)
    traces = collect_traces(loaded, list(dict.fromkeys(TINY_TEXTS)) * 8)
    emb = loaded.adapter.embeddings(loaded.model).weight.detach()
    cfg = TrainConfig(hidden=32, max_epochs=6, lr=5e-3, batch_size=8)
    untrained, _ = train(traces, emb, 8, TrainConfig(hidden=32, max_epochs=0))
    pred, report = train(traces, emb, 8, cfg, ckpt=tmp_path / "ckpt.pt", log=lambda m: None)
    assert hit_rates(pred, traces)["top1_hit_rate"] > hit_rates(untrained, traces)["top1_hit_rate"] + 0.1
    pred.eval()
    hit_rates(pred, traces)
    assert not pred.training  # `sida predictor eval` times it afterwards: an LSTM in training mode is slower
    pred.train()
    assert (tmp_path / "ckpt.pt").is_file() and len(report["history"]) >= 1

    save_predictor(pred, tmp_path / "pred", loaded.fingerprint, {"note": "test"})
    again, meta = load_predictor(tmp_path / "pred", loaded.fingerprint)
    assert meta["note"] == "test"
    table = PredictorHash(again, k=3)(traces.input_ids[:2], traces.attention_mask[:2])
    assert table.experts[0].shape == (2, traces.input_ids.shape[1], 3)
    assert find_predictor(tmp_path / "pred") == tmp_path / "pred" and find_predictor(tmp_path) is None
    with pytest.raises(PredictorError, match="trained for model"):
        load_predictor(tmp_path / "pred", load_model(tiny_dir).fingerprint)


def test_checkpoint_resumes_only_the_same_run(tiny8_dir, tmp_path):
    loaded = load_model(tiny8_dir)
    traces = collect_traces(loaded, list(dict.fromkeys(TINY_TEXTS)) * 4)
    emb = loaded.adapter.embeddings(loaded.model).weight.detach()
    ckpt, logs = tmp_path / "ckpt.pt", []
    train(traces, emb, 8, TrainConfig(hidden=16, max_epochs=1, batch_size=8), ckpt=ckpt, log=logs.append)
    _, report = train(traces, emb, 8, TrainConfig(hidden=16, max_epochs=2, batch_size=8), ckpt=ckpt, log=logs.append)
    assert not any("resumed" in m for m in logs)  # max_epochs differs: another run
    assert [r["epoch"] for r in report["history"]] == [1, 2]
    logs.clear()
    _, report = train(traces, emb, 8, TrainConfig(hidden=16, max_epochs=2, batch_size=8), ckpt=ckpt, log=logs.append)
    assert any("resumed" in m and "epoch 2" in m for m in logs) and len(report["history"]) == 2
