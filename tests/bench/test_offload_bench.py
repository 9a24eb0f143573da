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
    return argparse.Namespace(**{**defaults, "dtypes": None, "methods": None, "read_limits": None, **given})


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
    methods = ["resident", "lru", "layered", "oracle", "exact"]
    args = bench_args(preset="cpu-disk", batch_sizes=[8], budgets=[0.25], methods=methods, limit=16)
    rows = offload_bench.run(args, log=lambda m: None)["rows"]
    sida = {("lru", None), ("layered", None), ("oracle", 1), ("exact", 1), ("exact", 3)}
    cells = [(r["method"], r["prefetch_k"], r["read_limit_bytes_per_s"]) for r in rows]
    assert sorted(cells, key=str) == sorted(
        [("resident", None, None), *((m, k, None) for m, k in sida), *((m, k, 1e9) for m, k in sida)], key=str
    )  # the disk rows once as the disk is, once paced to 1 GB/s
    for row in rows:
        if row["method"] == "resident":
            assert row["min_bytes"] is None and row["bytes_over_min"] is None
            continue
        assert row["tier"] == "disk" and row["bytes_read"] >= row["on_demand_loads"] * row["expert_bytes"]
        assert row["agreement_with_resident"] == 1.0
        assert 0 <= row["stall_share"] < 1
        assert row["policy"] == ("lru" if row["method"] == "lru" else "layered")
        # Belady's reads are a floor no method goes under
        assert 0 < row["min_bytes"] <= row["bytes_moved"] and row["bytes_over_min"] >= 1.0
    assert all(r["prefetch_precision"] is not None for r in rows if r["method"] in ("exact", "oracle"))
    oracle = [r for r in rows if r["method"] == "oracle"]
    assert all(r["hash_hit_rate"]["top1"] == 1.0 for r in oracle)  # the router's own choices


def test_the_paced_cells_are_the_disk_rows_at_the_paced_budgets():
    preset = offload_bench.PRESETS["cpu-disk"]
    plan = offload_bench.cells(preset, offload_bench.METHODS, (0.1, 0.25), "disk")
    paced = [(m, f) for m, _, f, limit in plan if limit is not None]
    assert paced and all(f in preset.paced_budgets and m not in ("resident", "accelerate") for m, f in paced)
    assert offload_bench.cells(preset, offload_bench.METHODS, (0.25,), "ram") == [
        (m, k, 1.0 if m == "resident" else 0.25, None) for m, k in offload_bench.METHODS
    ]
