"""The benchmark on a slice of SST-2 dev: every method runs, rows carry the documented fields, and the
figures hang together (lossless methods agree with resident, peaks stay under budgets, bytes = loads × size)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import offload_bench  # noqa: E402
import report  # noqa: E402

ROW_FIELDS = (
    "method model batch_size budget_fraction prefetch_k seq_per_s p50_ms p99_ms peak_expert_bytes bytes_moved "
    "on_demand_loads hit_rate accuracy"
).split()


def bench_args(**given) -> argparse.Namespace:
    """The bench's command line for the demo model, with `given` options."""
    defaults = dict(preset="cpu", device="cpu", torch_threads=None, models=["demo"], tasks=None, batch_sizes=None)
    return argparse.Namespace(**{**defaults, "dtypes": None, "methods": None, **given})


@pytest.fixture(scope="module")
def result(demo_dir, data_dir):
    return offload_bench.run(bench_args(budgets=[0.25, 1.0], limit=64), log=lambda m: None)


@pytest.mark.slow
def test_every_method_and_budget_has_a_row_with_the_documented_fields(result):
    cells = {(r["method"], r["prefetch_k"], r["budget_fraction"]) for r in result["rows"]}
    assert ("resident", None, 1.0) in cells
    for method, k in offload_bench.METHODS[1:]:
        if method in offload_bench.PRESETS["cpu"].methods:
            assert {(method, k, 0.25), (method, k, 1.0)} <= cells
    for row in result["rows"]:
        assert set(ROW_FIELDS) <= set(row)
        assert row["model"] == "sida-switch-demo" and row["batch_size"] == 32 and row["examples"] == 64
    for key in ("device", "versions", "command", "date"):
        assert key in result["header"]


@pytest.mark.slow
def test_lossless_methods_predict_what_resident_predicts(result):
    for row in result["rows"]:
        if row["method"] in ("accelerate", "lru", "exact"):
            assert row["agreement_with_resident"] == 1.0, row


@pytest.mark.slow
def test_the_counts_hang_together(result):
    for row in result["rows"]:
        if row["method"] == "resident":
            assert row["bytes_moved"] == 0 and row["on_demand_loads"] == 0
            continue
        assert row["peak_expert_bytes"] <= row["budget_bytes"] + (
            row["expert_bytes"] if row["method"] == "accelerate" else 0
        )
        loads = row["on_demand_loads"] + row["prefetch_loads"]
        assert row["bytes_moved"] == loads * row["expert_bytes"], row
    small = [r for r in result["rows"] if r["budget_fraction"] == 0.25 and r["method"] != "resident"]
    assert all(r["on_demand_loads"] > 0 for r in small if r["method"] in ("accelerate", "lru"))
    exact = [r for r in small if r["method"] == "exact"]
    assert all(r["prefetch_loads"] > 0 and r["hash_hit_rate"]["top1"] > 0 for r in exact)


@pytest.mark.slow
def test_report_writes_tables_goals_and_plots(result, tmp_path):
    path = tmp_path / "cpu.json"
    for row in result["rows"]:
        row.pop("_predictions", None)
    path.write_text(json.dumps(result))
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\nhand-written text\n\n<!-- BEGIN cpu -->\nold\n<!-- END cpu -->\n")
    report.main([str(path), "--doc", str(doc), "--plots", str(tmp_path / "docs" / "img")])
    text = doc.read_text()
    assert "hand-written text" in text and "old" not in text.split("BEGIN cpu")[1]
    assert "| resident |" in text and "Goals:" in text and "exact` k3 at 100% budget" in text
    assert list((tmp_path / "docs" / "img").glob("cpu-*.png"))


def test_predictor_inputs_carry_the_task_prompt_once(data_dir):
    inputs = offload_bench.predictor_inputs(5)
    assert len(inputs) == 5
    assert all(x.startswith("sst2 sentence: ") and x.count("sst2 sentence:") == 1 for x in inputs)


@pytest.mark.slow
def test_disk_preset_reads_experts_from_the_disk_and_answers_as_resident(demo_dir, data_dir):
    args = bench_args(
        preset="cpu-disk", batch_sizes=[8], budgets=[0.25], methods=["resident", "lru", "layered", "exact"], limit=16
    )
    rows = offload_bench.run(args, log=lambda m: None)["rows"]
    assert {(r["method"], r["prefetch_k"]) for r in rows} == {
        ("resident", None),
        ("lru", None),
        ("layered", None),
        ("exact", 1),
        ("exact", 3),
    }
    for row in rows:
        if row["method"] == "resident":
            continue
        assert row["tier"] == "disk" and row["bytes_read"] >= row["on_demand_loads"] * row["expert_bytes"]
        assert row["agreement_with_resident"] == 1.0
        assert 0 <= row["stall_share"] < 1
        assert row["policy"] == ("lru" if row["method"] == "lru" else "layered")
    assert all(r["prefetch_precision"] is not None for r in rows if r["method"] == "exact")
