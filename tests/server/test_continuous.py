"""Continuous batching through the app on the decoder-only demo model: concurrent completions join one running decode
batch and each gets what it gets alone; the KV bound turns a burst into waits and 429s, never an allocator error; the
serving metrics and `/info` report what happened."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from sida.offload.model_loader import load_model
from sida.offload.runner import Runner
from sida.server.app import app_from_settings
from sida.server.settings import load_settings
from tests.conftest import REPO
from tests.live_server import metric_value

OLMOE_DEMO = REPO / "models" / "sida-olmoe-demo"
NAME = OLMOE_DEMO.name
PROMPTS = [
    "the city council voted on tuesday to",
    "a gorgeous , witty movie",
    "it 's a",
    "the lobster is a species of",
    "in the summer the team",
    "the album was released in",
]


def serve(**overrides) -> TestClient:
    settings = load_settings(
        model_dir=OLMOE_DEMO, mode="exact", budget_experts=32, max_batch_wait_ms=2, torch_threads=1, **overrides
    )
    return TestClient(app_from_settings(settings))


def complete(client: TestClient, prompt: str, max_tokens: int = 24, **extra):
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body)


@pytest.fixture(scope="module")
def alone() -> dict[str, str]:
    runner = Runner(load_model(OLMOE_DEMO))
    return {p: runner.complete([p], max_new_tokens=24)[0].text for p in PROMPTS}


def test_concurrent_completions_join_one_batch_and_match_their_lone_runs(alone):
    with serve() as client:
        info = client.get("/info").json()
        assert info["batching"] == "continuous"
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda p: complete(client, p), PROMPTS * 2))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
        assert [r.json()["choices"][0]["text"] for r in answers] == [alone[p] for p in PROMPTS * 2]
        text = client.get("/metrics").text
        assert metric_value(text, "sida_time_to_first_token_seconds_count") == len(answers)
        assert metric_value(text, "sida_e2e_request_latency_seconds_count") == len(answers)
        generated = sum(r.json()["usage"]["completion_tokens"] for r in answers)
        assert metric_value(text, "sida_generation_tokens_total") == generated
        assert metric_value(text, "sida_num_requests_running") == 0
        assert metric_value(text, 'sida_device_memory_bytes{kind="kv_cache"}') > 0
        decode = client.get("/info").json()["decode"]
        assert decode["running"] == 0 and decode["decode_steps"] < generated  # rows shared steps


def test_a_burst_beyond_the_kv_bound_waits_or_gets_429_never_an_error():
    long_prompt = " ".join(["the lobster is a species of crustacean ."] * 12)
    with serve(max_queue=4) as client:
        per_token = client.get("/info").json()["decode"]["kv_bytes_per_token"]
    need = len(Runner(load_model(OLMOE_DEMO)).tokenize([long_prompt])[0]) + 16
    with serve(max_queue=4, kv_cache_bytes=2 * need * per_token) as client:  # room for two such sequences
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: complete(client, long_prompt, 16, ignore_eos=True), range(12)))
        codes = sorted(r.status_code for r in answers)
        assert set(codes) <= {200, 429} and 200 in codes, codes
        for r in answers:
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "queue_full"
            else:
                assert r.json()["usage"]["completion_tokens"] == 16
        text = client.get("/metrics").text
        assert metric_value(text, "sida_kv_cache_usage_ratio") <= 1.0
        too_big = complete(client, long_prompt * 3, 16)
        assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "kv_cache_exceeded", too_big.text
        assert complete(client, PROMPTS[0], 4).status_code == 200  # and it keeps serving


def test_static_batching_is_still_there_and_gives_the_same_text(alone):
    with serve(batching="static") as client:
        assert client.get("/info").json()["batching"] == "static"
        r = complete(client, PROMPTS[0])
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone[PROMPTS[0]]
        r = complete(client, PROMPTS[1], 20, ignore_eos=True)
        assert r.json()["usage"]["completion_tokens"] == 20
