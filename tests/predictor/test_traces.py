import torch

from sida.offload.model_loader import load_model
from sida.predictor.traces import collect_traces, load_traces, save_traces, verify_alignment
from tests.conftest import TINY_TEXTS

INPUTS = list(dict.fromkeys(TINY_TEXTS)) + ["a b c", "the movie was good , really good , very good ."]


def test_rows_are_the_inputs_in_order(tiny8_dir):
    loaded = load_model(tiny8_dir)
    traces = collect_traces(loaded, INPUTS, top_t=30, batch_size=2)
    assert len(traces) == len(INPUTS) and traces.layers == [0]
    assert traces.top_idx[0].shape[-1] == 8  # T clipped to the number of experts
    for i in (0, 3, len(INPUTS) - 1):
        single = collect_traces(loaded, [INPUTS[i]])
        n = int(single.attention_mask.sum())
        assert int(traces.attention_mask[i].sum()) == n
        assert torch.equal(traces.input_ids[i, :n], single.input_ids[0, :n])
        assert torch.equal(traces.top_idx[0][i, :n, 0], single.top_idx[0][0, :n, 0])
    probs = traces.top_prob[0].float()
    assert (probs[..., :-1] >= probs[..., 1:]).all()  # best first


def test_save_load_round_trip(tiny8_dir, tmp_path):
    loaded = load_model(tiny8_dir)
    traces = collect_traces(loaded, INPUTS)
    save_traces(traces, tmp_path / "t.safetensors")
    back = load_traces(tmp_path / "t.safetensors")
    assert torch.equal(back.input_ids, traces.input_ids) and torch.equal(back.top_idx[0], traces.top_idx[0])
    assert back.fingerprint == loaded.fingerprint


def test_misaligned_traces_are_detected(tiny8_dir):
    loaded = load_model(tiny8_dir)
    traces = collect_traces(loaded, INPUTS * 3)
    assert verify_alignment(loaded, traces, rows=8) > 0.99
    perm = torch.roll(torch.arange(len(traces)), 1)  # tokens paired with the previous row's routing
    traces.input_ids, traces.attention_mask = traces.input_ids[perm], traces.attention_mask[perm]
    assert verify_alignment(loaded, traces, rows=8) < 0.9
