"""How much of the product one `/v1/classify` in `exact` mode passes through: the product modules whose functions
run while it is served, on every thread (event loop, batch worker, inference worker). docs/architecture.md lists
them; this test keeps that list true."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

from fastapi.testclient import TestClient

from sida.server.app import app_from_settings
from sida.server.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("offload", "predictor", "server", "demo_model")
BODY = {"model": "sida-switch-demo", "input": ["a gorgeous , witty , seductive movie ."]}


def modules_passed(**settings) -> dict[str, set[str]]:
    """Product module (path from the repo root) → the functions of it that ran while one classify was served
    (after a first classify, so that start-up and first-call work are not counted)."""
    seen: dict[str, set[str]] = {}
    recording = threading.Event()

    def profile(frame, event, _arg):
        if event != "call" or not recording.is_set():
            return
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(REPO) and path.relative_to(REPO).parts[0] in PACKAGES:
            seen.setdefault(str(path.relative_to(REPO)), set()).add(frame.f_code.co_name)

    threading.setprofile(profile)  # the worker threads start inside the app's lifespan, after this
    try:
        with TestClient(app_from_settings(load_settings(mode="exact", **settings))) as client:
            assert client.post("/v1/classify", json=BODY).status_code == 200
            sys.setprofile(profile)
            recording.set()
            response = client.post("/v1/classify", json=BODY)
            time.sleep(0.2)  # the workers finish the call's bookkeeping and wait again (modules already listed)
            recording.clear()
            sys.setprofile(None)
    finally:
        threading.setprofile(None)
    assert response.status_code == 200, response.text
    return seen


def documented(heading: str) -> set[str]:
    """The module paths listed in docs/architecture.md under `heading` (one `path` in backticks per list item)."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^- `([a-z_/]+\.py)`", section, flags=re.M))


def test_a_classify_under_a_budget_passes_the_documented_modules(demo_dir):
    """Experts over the budget: the predictor builds the table, the cache loads and evicts."""
    seen = modules_passed(budget_experts=8)
    assert set(seen) == documented("### Under a budget")


def test_a_classify_with_every_expert_resident_skips_the_predictor(demo_dir):
    """A budget that holds every expert never evicts: no table is built, nothing of the predictor package runs."""
    seen = modules_passed(budget_experts=64)
    assert not any(m.startswith("predictor/") for m in seen)
    assert set(seen) == documented("### Every expert within the budget")
