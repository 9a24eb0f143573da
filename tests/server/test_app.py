"""The real app (lifespan on) through Starlette's TestClient: API shapes, errors, metrics."""

import json

import pytest
from fastapi.testclient import TestClient

from sida.server.app import app_from_settings
from sida.server.settings import load_settings

MODEL = "sida-switch-demo"
SENTENCES = ["a gorgeous , witty , seductive movie .", "a dull , lifeless , boring mess .", "it 's fine ."]


def make_client(hash_source="oracle", **overrides):
    settings = load_settings(
        **{"mode": "exact", "budget_experts": 8, "max_batch_wait_ms": 20, "torch_threads": 1, **overrides}
    )
    return TestClient(app_from_settings(settings, hash_source))


@pytest.fixture(scope="module")
def client(demo_dir):
    with make_client() as c:
        yield c


def test_classify_agrees_with_the_runner(client, demo_loaded):
    from sida.offload.runner import Runner

    r = client.post("/v1/classify", json={"model": MODEL, "input": SENTENCES})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = Runner(demo_loaded).classify(SENTENCES)
    assert [d["label"] for d in body["data"]] == [c.label for c in expected]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] > 0


def test_workers_run_with_their_own_torch_thread_counts(demo_dir):
    """torch's thread count is per OS thread: the inference worker takes `torch_threads`, the batch worker
    `hash_torch_threads`, whatever thread set a count last."""
    import threading

    import torch

    seen = {}
    with make_client(torch_threads=2, hash_torch_threads=1) as c:
        runner = c.app.state.sida.runner

        def spy(name, original):
            def call(*args, **kwargs):
                seen[(name, threading.current_thread().name)] = torch.get_num_threads()
                return original(*args, **kwargs)

            return call

        for name in ("build_hash_table", "classify_ids"):
            setattr(runner, name, spy(name, getattr(runner, name)))
        assert c.post("/v1/classify", json={"model": MODEL, "input": SENTENCES}).status_code == 200
    assert seen[("build_hash_table", "sida-batch")] == 1 and seen[("classify_ids", "sida-inference")] == 2, seen


def test_completion_and_stream(client):
    r = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": ["the city", "a movie"], "max_tokens": 5, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 2
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    with client.stream(
        "POST",
        "/v1/completions",
        json={"model": MODEL, "prompt": "the city", "max_tokens": 5, "temperature": 0, "stream": True},
    ) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert text == body["choices"][0]["text"]  # greedy: the stream spells the same text


@pytest.mark.parametrize(
    "payload, status, param",
    [
        ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": 9}, 400, "temperature"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt"),
        ({"model": MODEL, "prompt": "word " * 600}, 400, "prompt"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ],
)
def test_bad_completion_requests(client, payload, status, param):
    r = client.post("/v1/completions", json=payload)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    assert client.post("/v1/classify", json={"model": MODEL, "input": "fine"}).status_code == 200  # still serving


def test_invalid_json_and_large_body(client):
    r = client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b"x" * 1_000_001, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_metrics_after_traffic(client):
    for _ in range(5):
        client.post("/v1/classify", json={"model": MODEL, "input": SENTENCES})
    text = client.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for metric in (
        "sida_queue_depth",
        "sida_hash_queue_depth",
        "sida_expert_budget_bytes",
        "sida_expert_loads_total",
        "sida_expert_bytes_transferred_total",
        "sida_expert_stall_seconds_total",
        "sida_expert_load_failures_total",
        "sida_expert_load_retries_total",
        "sida_batch_size_count",
        'sida_request_duration_seconds_count{endpoint="/v1/classify"}',
    ):
        assert metric in values, metric
    lookups = sum(v for k, v in values.items() if k.startswith("sida_hash_lookups_total"))
    hits1 = sum(v for k, v in values.items() if k.startswith("sida_hash_hits_total") and 'k="1"' in k)
    assert lookups > 0 and 0 <= hits1 <= lookups
    info = client.get("/info").json()
    assert (
        values["sida_expert_bytes_transferred_total"]
        == values["sida_expert_loads_total"] * info["offload"]["expert_bytes"]
    )
    assert 'sida_build_info{mode="exact",model="sida-switch-demo"' in text
    assert any(k.startswith("sida_resident_experts{") for k in values)
    assert 'sida_requests_total{endpoint="/v1/classify",status="200"}' in values


def test_models_health_info(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").json() == {"status": "ready"}
    info = client.get("/info").json()
    assert info["offload"]["budget_experts"] == 8 and info["hash"] == "oracle"


def test_not_ready_before_startup(demo_dir):
    c = make_client()  # no context manager: the lifespan has not run
    assert c.get("/health/ready").status_code == 503
    r = c.post("/v1/classify", json={"model": MODEL, "input": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


def test_api_key(demo_dir):
    with make_client(api_key="s3cret") as c:
        r = c.post("/v1/classify", json={"model": MODEL, "input": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = c.post("/v1/classify", json={"model": MODEL, "input": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health/live").status_code == 200  # health needs no key


def test_a_call_over_the_queue_bound_and_a_deadline(demo_dir):
    """A call with more inputs than the queue holds could never be accepted: 400, not a 429 a client would retry
    (a burst's 429s are in test_overload.py)."""
    with make_client(max_queue=1) as c:
        r = c.post("/v1/classify", json={"model": MODEL, "input": ["a", "b"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_inputs"
        assert c.post("/v1/classify", json={"model": MODEL, "input": "a"}).status_code == 200
    with make_client(request_timeout_s=0.0) as c:
        r = c.post("/v1/classify", json={"model": MODEL, "input": "a"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
