"""CUDA-only checks (skipped without a GPU): the same equality on the device, pinned copies, budget in bytes."""

import pytest
import torch

from sida.offload.engine import OffloadConfig, OffloadEngine
from sida.offload.model_loader import load_model
from sida.offload.runner import Runner
from sida.offload.task_accuracy import evaluate

pytestmark = pytest.mark.gpu


def test_exact_on_cuda_equals_resident_and_keeps_the_budget(demo_dir, data_dir):
    cuda = torch.device("cuda")
    data = data_dir / "sst2" / "dev.tsv"
    resident = evaluate(Runner(load_model(demo_dir, device="cuda"), "cuda"), "sst2", data, progress=False)
    loaded = load_model(demo_dir, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=3), cuda)
    assert engine.cache.store.pinned
    # the 64 experts left the device; only the 3-slot pool was allocated in their place
    assert base - torch.cuda.memory_allocated() >= (engine.total_experts - 3) * engine.expert_bytes
    result = evaluate(Runner(loaded, "cuda", engine=engine), "sst2", data, progress=False)
    assert result.predictions == resident.predictions
    assert engine.cache.stats.peak_resident <= 3


def test_served_on_cuda_the_predictor_stream_feeds_the_inference_stream(demo_dir):
    """The predictor worker builds tables on its own stream; the inference worker's stream waits on its event."""
    from fastapi.testclient import TestClient

    from sida.offload.runner import Runner
    from sida.server.app import app_from_settings
    from sida.server.settings import load_settings

    sentences = ["a gorgeous , witty , seductive movie .", "a dull , lifeless , boring mess ."] * 20
    expected = [c.label for c in Runner(load_model(demo_dir)).classify(sentences)]
    settings = load_settings(device="cuda", mode="exact", budget_experts=8)
    with TestClient(app_from_settings(settings)) as client:
        r = client.post("/v1/classify", json={"model": "sida-switch-demo", "input": sentences})
        assert r.status_code == 200, r.text
        assert [d["label"] for d in r.json()["data"]] == expected
        metrics = client.get("/metrics").text
    assert "sida_hash_lookups_total" in metrics
