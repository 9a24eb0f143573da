"""CUDA-only checks (skipped without a GPU): the same equality on the device, pinned copies, budget in bytes."""

import pytest
import torch

from offload.engine import OffloadConfig, OffloadEngine
from offload.model_loader import load_model
from server.evaluation import evaluate
from server.runner import Runner

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
