"""The decode bench on the decoder-only demo, a few tokens: the lossless methods give the eager reference's tokens,
the oracle replays the router's own choices (decode-step recall 1.0, so its alignment with the steps is right),
and each row says per layer where the copies went."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import decode_offload  # noqa: E402

DEMO = REPO / "models" / "sida-olmoe-demo"
pytestmark = pytest.mark.slow


def test_lossless_rows_match_the_reference_and_the_oracle_knows_every_step(tmp_path):
    out = tmp_path / "decode.json"
    argv = ["--model", str(DEMO), "--budgets", "0.25", "--streams", "1,2", "--tokens", "6"]
    decode_offload.main([*argv, "--methods", "lru,exact,oracle", "--out", str(out)])
    rows = {(r["method"], r["streams"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(m, n) for m in ("lru", "exact", "oracle") for n in (1, 2)}
    assert all(r["same_tokens_as_resident"] is True for r in rows.values())
    assert rows[("oracle", 1)]["decode_recall"] == 1.0 == rows[("oracle", 2)]["decode_recall"]
    assert rows[("exact", 1)]["decode_recall"] < 1.0
    layers = rows[("lru", 1)]["per_layer"]
    assert [p["layer"] for p in layers] == list(range(len(layers)))
    loads = sum(p["on_demand"] for p in layers)
    assert loads == rows[("lru", 1)]["on_demand_loads"] and sum(p["on_demand_bytes"] for p in layers) > 0
