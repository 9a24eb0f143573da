"""The locust load test (loadtest/): its inputs from the shared data, its pass/fail rules, and a short headless run
of `loadtest/run.py` against `sida serve` on loopback that must pass and leave its CSV files and HTML report."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.inputs import mrpc_pairs, read_inputs, sst2_sentences, wikitext_prompts
from loadtest.thresholds import DEFAULT_P95_MS, DEFAULT_WEIGHTS, KINDS, Entry, parse_kinds, verdict

pytestmark = pytest.mark.slow  # a live daemon and locust

REPO = Path(__file__).resolve().parent.parent


def test_inputs_are_real_sentences(data_dir):
    sentences, pairs, prompts = sst2_sentences(data_dir), mrpc_pairs(data_dir), wikitext_prompts(data_dir)
    assert len(sentences) == 872 and all(s.strip() for s in sentences)
    assert len(pairs) == 408 and all(len(p) == 2 and all(p) for p in pairs)
    assert len(prompts) > 500
    assert all(6 <= len(p.split()) <= 20 and "@" not in p and "<unk>" not in p for p in prompts)
    assert wikitext_prompts(data_dir) == prompts  # the same prompts every run


def test_a_missing_data_folder_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="SIDA_LOADTEST_DATA"):
        read_inputs(tmp_path)


def test_kind_settings():
    assert parse_kinds("", DEFAULT_WEIGHTS, "w") == DEFAULT_WEIGHTS
    assert parse_kinds("stream=0, mrpc=5", DEFAULT_WEIGHTS, "w") == {**DEFAULT_WEIGHTS, "stream": 0, "mrpc": 5}
    assert parse_kinds("250", DEFAULT_P95_MS, "p") == dict.fromkeys(KINDS, 250.0)
    for bad in ("chat=1", "sst2=fast", "sst2=-1"):
        with pytest.raises(ValueError, match="--sida-weights"):
            parse_kinds(bad, DEFAULT_WEIGHTS, "--sida-weights")


def test_verdict():
    limits = dict.fromkeys(KINDS, 100.0)
    ok = [Entry("sst2", 1000, 5, 80), Entry("stream", 10, 0, 99)]
    assert verdict(ok, 0.01, limits) == []
    assert verdict([Entry("sst2", 100, 2, 80)], 0.01, limits) == ["2 of 100 calls failed: ratio 0.0200 > 0.01"]
    assert verdict([Entry("sst2", 10, 0, 80), Entry("complete", 10, 0, 150)], 0.01, limits) == [
        "complete: p95 150 ms > 100 ms"
    ]
    assert verdict([Entry("sst2", 0, 0, 0)], 0.01, limits) == ["no call was made"]


def test_a_short_run_passes_and_writes_its_report(demo_dir, data_dir, tmp_path):
    assert importlib.util.find_spec("locust") is not None, "locust is not installed: `make install` (test extras)"
    out = tmp_path / "loadtest"
    cmd = [sys.executable, "loadtest/run.py", "--run-time", "15s", "--users", "4", "--out", str(out)]
    cmd += ["--data", str(data_dir), "--", "--sida-p95-ms", "20000"]  # loose: the test box is shared
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "loadtest passed" in run.stderr
    for name in ("sida_stats.csv", "sida_stats_history.csv", "sida_failures.csv", "report.html"):
        assert (out / name).stat().st_size > 0, name
    with (out / "sida_stats.csv").open() as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    for name in ("/v1/classify [sst2]", "/v1/classify [mrpc]", "/v1/completions", "/v1/completions [stream]"):
        assert int(rows[name]["Request Count"]) > 0 and int(rows[name]["Failure Count"]) == 0, rows[name]
