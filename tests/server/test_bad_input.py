"""Bad input, one table: each request gets its status and the error envelope (all four keys), and the server
still answers a good request after it. The server is the real app on the demo model, on a real socket (a
client that never finishes its body needs one), with an API key set, so that every request carries it. The demo
model's tokenizer has no chat template: every chat is refused."""

from __future__ import annotations

import json
import socket
import time
from typing import NamedTuple

import httpx
import pytest

from tests.server.test_overload import MODEL, demo_app, running

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_TIMEOUT_S = 1.0
MAX_BODY = 1_000_000
SLOW = "slow"  # a case sent by `send_slowly`


@pytest.fixture(scope="module")
def server(demo_dir):
    with running(demo_app(body_timeout_s=BODY_TIMEOUT_S, api_key=KEY, max_queue=64)) as base:
        with httpx.Client(base_url=base, timeout=30, headers=AUTH) as c:
            yield base, c


class Case(NamedTuple):
    name: str
    request: dict | str  # httpx.Client.request keywords (method, url, json / content, headers), or SLOW
    status: int
    type: str | None = "invalid_request_error"
    code: str | None = None
    param: str | None = None


def completion(**fields) -> dict:
    return {"method": "POST", "url": "/v1/completions", "json": {"model": MODEL, "prompt": "the city", **fields}}


def classify(**fields) -> dict:
    return {"method": "POST", "url": "/v1/classify", "json": {"model": MODEL, "input": "a fine film .", **fields}}


def chat(**fields) -> dict:
    messages = [{"role": "user", "content": "the city"}]
    return {"method": "POST", "url": "/v1/chat/completions", "json": {"model": MODEL, "messages": messages, **fields}}


def raw(body: bytes, url: str = "/v1/completions", content_type: str | None = "application/json") -> dict:
    headers = {"content-type": content_type} if content_type else {}
    return {"method": "POST", "url": url, "content": body, "headers": headers}


def without(request: dict, field: str) -> dict:
    return {**request, "json": {k: v for k, v in request["json"].items() if k != field}}


def chunked(body: bytes):
    for i in range(0, len(body), 65536):
        yield body[i : i + 65536]


NESTED = b'{"model": "' + MODEL.encode() + b'", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BIG = b'{"model": "x", "prompt": "' + b"a" * MAX_BODY + b'"}'

CASES = [
    Case("malformed JSON", raw(b'{"model": "sida-switch-demo", "prompt": '), 400, code="invalid_json"),
    Case("wrong content type", raw(json.dumps(completion()["json"]).encode(), content_type="text/plain"), 400,
         code="invalid_body"),
    Case("no content type", raw(json.dumps(completion()["json"]).encode(), content_type=None), 400,
         code="invalid_body"),
    Case("empty body", raw(b""), 400, code="invalid_body"),
    Case("body is a JSON list", raw(b"[]"), 400, code="invalid_body"),
    Case("prompt of the wrong type", completion(prompt=123), 400, code="invalid_type", param="prompt"),
    Case("max_tokens of the wrong type", completion(max_tokens="many"), 400, code="invalid_type", param="max_tokens"),
    Case("model of the wrong type", completion(model=5), 400, code="invalid_type", param="model"),
    Case("stream of the wrong type", completion(stream="maybe"), 400, code="invalid_type", param="stream"),
    Case("input of the wrong type", classify(input=[1, 2]), 400, code="invalid_type", param="input"),
    Case("missing prompt", without(completion(), "prompt"), 400, code="missing_required_parameter", param="prompt"),
    Case("missing model", without(classify(), "model"), 400, code="missing_required_parameter", param="model"),
    Case("unknown fields are ignored", completion(max_tokens=2, frobnicate=1, user="u"), 200, None),
    Case("empty prompt", completion(prompt=""), 400, code="invalid_value", param="prompt"),
    Case("empty prompt list", completion(prompt=[]), 400, code="invalid_value", param="prompt"),
    Case("empty input list", classify(input=[]), 400, code="invalid_value", param="input"),
    Case("prompt over max_input_tokens", completion(prompt="word " * 600), 400, code="context_length_exceeded",
         param="prompt"),
    Case("body over max_body_bytes", raw(BIG), 413, code="body_too_large"),
    Case("chunked body over max_body_bytes", {**raw(b""), "content": chunked(BIG)}, 413, code="body_too_large"),
    Case("max_tokens 0", completion(max_tokens=0), 400, code="invalid_value", param="max_tokens"),
    Case("max_tokens -1", completion(max_tokens=-1), 400, code="invalid_value", param="max_tokens"),
    Case("max_tokens huge", completion(max_tokens=10**12), 400, code="invalid_value", param="max_tokens"),
    Case("temperature over 2", completion(temperature=9), 400, code="invalid_value", param="temperature"),
    Case("temperature below 0", completion(temperature=-0.5), 400, code="invalid_value", param="temperature"),
    Case("top_p 0", completion(top_p=0), 400, code="invalid_value", param="top_p"),
    Case("top_p over 1", completion(top_p=1.5), 400, code="invalid_value", param="top_p"),
    Case("seed over 64 bits", completion(seed=2**70), 400, code="invalid_value", param="seed"),
    Case("five stop strings", completion(stop=list("abcde")), 400, code="invalid_value", param="stop"),
    Case("n 0", completion(n=0), 400, code="invalid_value", param="n"),
    Case("unknown task", classify(task="nope"), 400, code="invalid_value", param="task"),
    Case("chat with a model without a chat template", chat(), 400, code="chat_template_missing", param="messages"),
    Case("chat without messages", chat(messages=[]), 400, code="invalid_value", param="messages"),
    Case("chat top_logprobs without logprobs", chat(top_logprobs=2), 400, code="invalid_value",
         param="top_logprobs"),
    Case("unknown model", completion(model="gpt-4"), 404, code="model_not_found", param="model"),
    Case("invalid UTF-8 body", raw(b'{"model": "sida-switch-demo", "prompt": "\xff\xfe"}'), 400,
         code="invalid_json"),
    Case("lone surrogate escape", raw(b'{"model": "sida-switch-demo", "prompt": "a \\ud800 b"}'), 400,
         code="invalid_value", param="prompt"),
    Case("NaN temperature", raw(b'{"model": "sida-switch-demo", "prompt": "x", "temperature": NaN}'), 400,
         code="invalid_value", param="temperature"),
    Case("Infinity top_p", raw(b'{"model": "sida-switch-demo", "prompt": "x", "top_p": Infinity}'), 400,
         code="invalid_value", param="top_p"),
    Case("NaN max_tokens", raw(b'{"model": "sida-switch-demo", "prompt": "x", "max_tokens": NaN}'), 400,
         code="invalid_value", param="max_tokens"),
    Case("deeply nested JSON", raw(NESTED), 400, code="invalid_json"),
    Case("10,000 inputs", classify(input=[f"film {i} ." for i in range(10_000)]), 400, code="too_many_inputs",
         param="input"),
    Case("unknown path", {"method": "GET", "url": "/v1/nope"}, 404, code="not_found"),
    Case("unknown path outside /v1", {"method": "POST", "url": "/admin", "json": {}}, 404, code="not_found"),
    Case("wrong method", {"method": "GET", "url": "/v1/completions"}, 405, code="method_not_allowed"),
    Case("missing API key", {**classify(), "headers": {"Authorization": ""}}, 401, "authentication_error",
         "invalid_api_key"),
    Case("wrong API key", {**classify(), "headers": {"Authorization": "Bearer nope"}}, 401, "authentication_error",
         "invalid_api_key"),
    Case("body never finished", SLOW, 408, code="body_timeout"),
]  # fmt: skip


def send_slowly(base: str, c: httpx.Client) -> tuple[int, dict]:
    """Headers and part of a body, then nothing: others are served meanwhile, and the server answers 408 and
    closes the connection once `BODY_TIMEOUT_S` has passed."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        head = f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        s.sendall(f"{head}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode() + b'{"model"')
        t0 = time.monotonic()
        good = c.request(**classify())
        assert good.status_code == 200 and time.monotonic() - t0 < BODY_TIMEOUT_S  # not held up by the slow one
        s.settimeout(BODY_TIMEOUT_S + 10)
        data = b""
        while chunk := s.recv(65536):  # until the server closes the connection
            data += chunk
    assert time.monotonic() - t0 < BODY_TIMEOUT_S + 3  # cut off, not left to the keep-alive timeout
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(server, case: Case):
    base, c = server
    if case.request == SLOW:
        status, body = send_slowly(base, c)
    else:
        r = c.request(**case.request)
        status, body = r.status_code, r.json()
    assert status == case.status, body
    if status == 200:
        assert body["choices"][0]["text"] is not None
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        err = body["error"]
        assert (err["type"], err["code"], err["param"]) == (case.type, case.code, case.param), err
        assert err["message"]
    if case.status == 405:
        assert r.headers["allow"] == "POST"
    good = c.request(**classify())
    assert good.status_code == 200 and good.json()["data"][0]["label"] in ("positive", "negative")


def test_unknown_paths_share_one_metrics_label(server):
    """Every path no route serves counts under endpoint="unmatched": no series per path a client makes up."""
    _, c = server
    for path in ("/v1/a", "/v1/b", "/c"):
        assert c.get(path).status_code == 404
    series = [line for line in c.get("/metrics").text.splitlines() if line.startswith("sida_requests_total{")]
    endpoints = {line.split('endpoint="')[1].split('"')[0] for line in series}
    assert "unmatched" in endpoints and not endpoints & {"/v1/a", "/v1/b", "/c"}
    assert endpoints <= {"unmatched", "/v1/classify", "/v1/completions", "/v1/chat/completions", "/v1/models"} | {
        "/metrics",
        "/info",
        "/health/live",
        "/health/ready",
    }
