"""The locust load test (loadtest/): its inputs from the shared data, its pass/fail rules and stream timings, and
short headless runs of `loadtest/run.py` against `sida serve` on loopback that must pass and leave their CSV files
and HTML report: the default mix on the Switch demo, and streamed chat on the OLMoE demo (it has a chat template)."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.inputs import mrpc_pairs, read_inputs, sst2_sentences, wikitext_prompts
from loadtest.thresholds import (
    DEFAULT_P95_MS,
    DEFAULT_WEIGHTS,
    KINDS,
    TIMINGS,
    Entry,
    parse_kinds,
    stream_timings,
    verdict,
)

REPO = Path(__file__).resolve().parent.parent
OLMOE = REPO / "models" / "sida-olmoe-demo"


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
    assert parse_kinds("chat=1", DEFAULT_WEIGHTS, "w") == {**DEFAULT_WEIGHTS, "chat": 1}
    assert parse_kinds("250", DEFAULT_P95_MS, "p") == dict.fromkeys(KINDS + TIMINGS, 250.0)
    limits = parse_kinds("chat_ttft=800,chat_tpot=40", DEFAULT_P95_MS, "p")
    assert limits == {**DEFAULT_P95_MS, "chat_ttft": 800, "chat_tpot": 40}
    for bad in ("embed=1", "chat_ttft=1", "sst2=fast", "sst2=-1"):  # a timing has a limit, not a weight
        with pytest.raises(ValueError, match="--sida-weights"):
            parse_kinds(bad, DEFAULT_WEIGHTS, "--sida-weights")


def test_defaults_leave_chat_out_and_limit_every_kind_and_timing():
    assert set(DEFAULT_WEIGHTS) == set(KINDS) and set(DEFAULT_P95_MS) == set(KINDS + TIMINGS)
    assert [k for k in KINDS if DEFAULT_WEIGHTS[k] > 0] == ["sst2", "mrpc", "complete", "stream"]  # the Switch demo


def test_verdict():
    limits = dict.fromkeys(KINDS, 100.0)
    ok = [Entry("sst2", 1000, 5, 80), Entry("stream", 10, 0, 99)]
    assert verdict(ok, 0.01, limits) == []
    assert verdict([Entry("sst2", 100, 2, 80)], 0.01, limits) == ["2 of 100 calls failed: ratio 0.0200 > 0.01"]
    assert verdict([Entry("sst2", 10, 0, 80), Entry("complete", 10, 0, 150)], 0.01, limits) == [
        "complete: p95 150 ms > 100 ms"
    ]
    assert verdict([Entry("sst2", 0, 0, 0)], 0.01, limits) == ["no call was made"]


def test_verdict_of_chat_timings():
    limits = {**dict.fromkeys(KINDS, 1000.0), "chat_ttft": 300.0, "chat_tpot": 30.0}
    ok = [Entry("chat", 100, 0, 900), Entry("chat_ttft", 100, 0, 250), Entry("chat_tpot", 97, 0, 29)]
    assert verdict(ok, 0.01, limits) == []
    slow = [Entry("chat", 100, 0, 900), Entry("chat_ttft", 100, 0, 450), Entry("chat_tpot", 97, 0, 41)]
    assert verdict(slow, 0.01, limits) == ["chat_ttft: p95 450 ms > 300 ms", "chat_tpot: p95 41 ms > 30 ms"]
    # a timing's samples are not calls: 1 failed chat call of 100 is 1%, not 1 of 297
    failed = [Entry("chat", 100, 1, 900), Entry("chat_ttft", 99, 0, 250), Entry("chat_tpot", 98, 0, 29)]
    assert verdict(failed, 0.005, limits) == ["1 of 100 calls failed: ratio 0.0100 > 0.005"]
    assert verdict([Entry("chat", 0, 0, 0), Entry("chat_ttft", 0, 0, 0)], 0.01, limits) == ["no call was made"]


def test_stream_timings():
    assert stream_timings(None) == (None, None)  # the call failed
    assert stream_timings([]) == (None, None)  # no token
    assert stream_timings([120.0]) == (120.0, None)  # one token: no gap after the first
    assert stream_timings([100.0, 130.0, 190.0, 220.0]) == (100.0, 40.0)  # (220 - 100) / 3


def short_run(data_dir: Path, out: Path, run_args=(), locust_args=()) -> dict[str, dict[str, str]]:
    """`loadtest/run.py` for 15 s with 4 users and loose limits (the test box is shared), which must pass and
    write its report; its stats rows by name."""
    assert importlib.util.find_spec("locust") is not None, "locust is not installed: `make install` (test extras)"
    cmd = [sys.executable, "loadtest/run.py", "--run-time", "15s", "--users", "4", "--out", str(out)]
    cmd += ["--data", str(data_dir), *run_args, "--", "--sida-p95-ms", "20000", *locust_args]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "loadtest passed" in run.stderr
    for name in ("sida_stats.csv", "sida_stats_history.csv", "sida_failures.csv", "report.html"):
        assert (out / name).stat().st_size > 0, name
    with (out / "sida_stats.csv").open() as f:
        return {r["Name"]: r for r in csv.DictReader(f)}


@pytest.mark.slow  # a live daemon and locust
def test_a_short_run_passes_and_writes_its_report(demo_dir, data_dir, tmp_path):
    rows = short_run(data_dir, tmp_path / "loadtest")
    for name in ("/v1/classify [sst2]", "/v1/classify [mrpc]", "/v1/completions", "/v1/completions [stream]"):
        assert int(rows[name]["Request Count"]) > 0 and int(rows[name]["Failure Count"]) == 0, rows[name]
    assert not any(name.startswith("/v1/chat/") for name in rows)  # chat is off by default


@pytest.mark.slow  # a live daemon and locust
def test_a_short_chat_run_reports_ttft_and_tpot(data_dir, tmp_path):
    assert (OLMOE / "config.json").is_file(), f"decoder-only demo missing at {OLMOE}"
    only_chat = ["--sida-weights", "sst2=0,mrpc=0,complete=0,stream=0,chat=1"]
    rows = short_run(data_dir, tmp_path / "loadtest", ["--model", str(OLMOE)], only_chat)
    chat, ttft, tpot = (rows[f"/v1/chat/completions [stream{s}]"] for s in ("", ", TTFT", ", TPOT"))
    assert int(chat["Request Count"]) > 0 and int(chat["Failure Count"]) == 0, chat
    assert 0 < int(ttft["Request Count"]) <= int(chat["Request Count"])  # answers with a token (not EOS first)
    assert 0 < int(tpot["Request Count"]) <= int(chat["Request Count"])  # those with two tokens or more
    assert float(tpot["Median Response Time"]) < float(chat["Median Response Time"])
