"""The short form of `make chaos`: 10% of the disk tier's expert reads fail and 5% stall, one byte of the expert
file is flipped, while mixed traffic runs; every answer is the resident server's or a 5xx envelope, none hangs,
nothing stays pinned, and `/metrics` counts every injected failure and the one repair."""

from __future__ import annotations

import json

import pytest

from bench import chaos

pytestmark = pytest.mark.slow


def test_faulty_reads_under_traffic_give_right_answers_or_5xx_and_every_fault_is_counted(demo_dir, capsys):
    code = chaos.main(["--model", str(demo_dir), "--fail-rate", "0.1", "--calls", "24", "--rounds", "2"])
    row = json.loads(capsys.readouterr().out)
    assert row["checks"] == dict.fromkeys(row["checks"], True), row
    assert code == 0
    assert row["injected_failures"] > 0 and row["counted_failures"] == row["injected_failures"]
    assert row["right"] > 0 and row["right"] + row["server_errors"] == row["calls"]
    assert row["repairs"] == 1 and row["pinned_after"] == 0


def test_the_wrapper_fails_and_stalls_at_its_rates_and_counts_what_it_injected():
    reads = []
    faults = chaos.FaultyReads(lambda key, buf: reads.append(key), fail_rate=0.25, stall_rate=0.0, stall_s=0.0, seed=1)
    failed = 0
    for i in range(400):
        try:
            faults((0, i), None)
        except OSError:
            failed += 1
    assert failed == faults.failures and 60 < failed < 140 and len(reads) == 400 - failed
