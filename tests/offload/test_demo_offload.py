"""`exact` mode on the shipped demo model: the same 872 SST-2 dev predictions as resident, at every budget."""

import json
import subprocess
import sys

import pytest
import torch

from sida.offload.engine import OffloadConfig, OffloadEngine
from sida.offload.model_loader import load_model
from sida.offload.runner import Runner
from sida.offload.task_accuracy import evaluate
from tests.conftest import REPO

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def resident(demo_dir, data_dir):
    return evaluate(Runner(load_model(demo_dir)), "sst2", data_dir / "sst2" / "dev.tsv", progress=False)


def exact_eval(demo_dir, data_dir, **cfg):
    loaded = load_model(demo_dir)
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", **cfg), CPU)
    result = evaluate(Runner(loaded, engine=engine), "sst2", data_dir / "sst2" / "dev.tsv", progress=False)
    return result, engine


# 64 experts in all: 1, 3, one layer's worth (16 = also 25%), 50%
@pytest.mark.slow
@pytest.mark.parametrize("budget", [1, 3, 16, 32])
def test_exact_equals_resident_at_every_budget(demo_dir, data_dir, resident, budget):
    result, engine = exact_eval(demo_dir, data_dir, budget_experts=budget)
    assert result.predictions == resident.predictions
    s = engine.cache.stats
    assert s.peak_resident <= budget
    assert s.on_demand_loads > 0  # no predictor: every load is on demand
    if budget < 16:
        assert s.waves > 0


@pytest.mark.parametrize(
    "policy, tier", [("fifo", "ram"), ("lfu", "ram"), ("fifo", "disk"), ("lru", "disk"), ("lfu", "disk")]
)
@pytest.mark.slow
def test_exact_equals_resident_for_every_policy_and_tier(demo_dir, data_dir, resident, tmp_path, policy, tier):
    result, engine = exact_eval(demo_dir, data_dir, budget_experts=3, policy=policy, tier=tier, expert_dir=tmp_path)
    assert result.predictions == resident.predictions
    assert engine.cache.stats.peak_resident <= 3


def test_exact_logits_equal_huggingface(demo_dir, data_dir):
    from sida.offload.tasks import get_task

    prompts = [e.prompt for e in get_task("sst2").read(data_dir / "sst2" / "dev.tsv", limit=48)]
    plain = Runner(load_model(demo_dir))
    loaded = load_model(demo_dir)
    offloaded = Runner(loaded, engine=OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=5), CPU))
    outs = []
    for r in (plain, offloaded):
        enc = r.encode(prompts)
        start = r.loaded.decoder_start_ids(len(prompts))
        r.begin_batch(enc, start, r.build_hash_table(enc, start))
        with torch.inference_mode():
            outs.append(r.model(**enc, decoder_input_ids=start).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_prediction_files_compare_equal(demo_dir, data_dir, tmp_path):
    files = []
    for mode in (["--mode", "resident"], ["--mode", "exact", "--budget-experts", "3", "--policy", "fifo"]):
        out = tmp_path / f"{mode[1]}.jsonl"
        args = ["eval", "--task", "sst2", "--data", str(data_dir / "sst2" / "dev.tsv"), "--limit", "120"]
        r = subprocess.run(
            [sys.executable, "-m", "server.cli", *args, *mode, "--out", str(out), "--json"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        for key in (
            "expert_loads",
            "expert_bytes_moved",
            "peak_resident_experts",
            "cache_hit_rate",
            "on_demand_loads",
            "stall_seconds",
        ):
            assert key in summary, key
        files.append(out.read_bytes())
    assert summary["peak_resident_experts"] <= 3 and summary["expert_loads"] > 0
    assert files[0] == files[1]
