"""`ProxyRetry`'s deadline (server/ray_serve.py): one `request_timeout_s` from the call's arrival at Ray's proxy
bounds every attempt together, a call that timed out is not sent again, and an input that stopped two replicas
gets a 500 that invites no third try. A fake stands for Ray's proxy and its replica, as Ray 2.60 behaves: it
honours `x-request-timeout-seconds` (cancels the replica call and answers a plain-text 408), and a replica that
dies leaves the proxy with no response."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'sida[ray]')")

from sida.server import ray_serve  # noqa: E402
from sida.server.settings import Settings  # noqa: E402

TIMEOUT_HEADER = b"x-request-timeout-seconds"  # Ray's per-call timeout (ray.serve._private.constants)
SLACK_S = 0.4  # scheduling slack on a shared box


def fake_ray_proxy(behaviours: list, seen: list[dict]):
    """Ray's proxy app with one replica per attempt. A behaviour is ("died", s): the replica dies after s seconds;
    ("works", s): it answers 200 after s seconds, unless the call's timeout header ends it first (then Ray's
    408); or an exception the proxy app raises."""

    async def app(scope, receive, send):
        await receive()
        headers = dict(scope["headers"])
        seen.append(headers)
        kind = behaviours[len(seen) - 1]
        if isinstance(kind, BaseException):
            raise kind
        what, seconds = kind
        timeout = float(headers[TIMEOUT_HEADER]) if TIMEOUT_HEADER in headers else None
        if what == "died":
            await asyncio.sleep(seconds)
            return
        if timeout is not None and timeout < seconds:
            await asyncio.sleep(timeout)
            await send({"type": "http.response.start", "status": 408, "headers": []})
            await send({"type": "http.response.body", "body": f"Request timed out after {timeout}s.".encode()})
            return
        await asyncio.sleep(seconds)
        header = (ray_serve.REPLICA_HEADER.encode(), b"sida#a")
        await send({"type": "http.response.start", "status": 200, "headers": [header]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def call(behaviours: list, deadline_s: float, grace_s: float = 0.1, client_headers=()) -> tuple:
    """One call through `ProxyRetry(deadline_s, grace_s)`: (status, headers, body, seconds, each attempt's headers)."""
    seen: list[dict] = []
    sent: list[dict] = []
    inbox = [{"type": "http.request", "body": b'{"input": "x"}', "more_body": False}]

    async def receive():
        return inbox.pop() if inbox else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": list(client_headers)}
    proxy = ray_serve.ProxyRetry(fake_ray_proxy(behaviours, seen), deadline_s=deadline_s, grace_s=grace_s)
    start = time.monotonic()
    asyncio.run(proxy(scope, receive, send))
    seconds = time.monotonic() - start
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], dict(sent[0]["headers"]), body, seconds, seen


def deadline_error(status: int, body: bytes) -> dict:
    assert status == 504, (status, body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("timeout_error", "deadline_exceeded"), error
    return error


def test_each_attempt_carries_what_is_left_of_the_deadline_as_rays_call_timeout():
    status, _, body, _, seen = call([("died", 0.3), ("works", 0.0)], deadline_s=2.0, grace_s=0.5)
    assert status == 200 and body == b"ok"
    first, second = (float(h[TIMEOUT_HEADER]) for h in seen)
    assert first == pytest.approx(2.5, abs=0.05)  # the deadline and the grace
    assert 2.5 - 0.3 - SLACK_S < second < 2.5 - 0.3 + 0.05  # less the first attempt's time
    # a client's own value of Ray's header does not lift the bound
    _, _, _, _, seen = call([("works", 0.0)], deadline_s=2.0, grace_s=0.5, client_headers=[(TIMEOUT_HEADER, b"600")])
    assert [v for k, v in seen[0].items() if k == TIMEOUT_HEADER] == [b"2.500"]


def test_a_retry_after_a_death_gets_only_what_is_left_so_the_wait_stays_about_one_deadline():
    status, _, body, seconds, seen = call([("died", 0.4), ("works", 3.0)], deadline_s=0.6)
    deadline_error(status, body)
    assert len(seen) == 2 and seconds < 0.6 + 0.1 + SLACK_S, seconds
    # a replica that dies once the deadline has passed: nothing is left to send the call again with
    status, _, body, seconds, seen = call([("died", 0.5), ("works", 0.0)], deadline_s=0.3)
    deadline_error(status, body)
    assert len(seen) == 1


def test_a_call_that_timed_out_is_not_sent_again():
    status, _, body, seconds, seen = call([("works", 3.0), ("works", 0.0)], deadline_s=0.5)
    assert "0.5" in deadline_error(status, body)["message"]
    assert len(seen) == 1 and seconds < 0.5 + 0.1 + SLACK_S, seconds
    # the proxy app raising a timeout (its replica may still be computing): answered 504, not tried again
    status, _, body, _, seen = call([TimeoutError(), ("works", 0.0)], deadline_s=5.0)
    deadline_error(status, body)
    assert len(seen) == 1


def test_an_input_that_stopped_two_replicas_gets_a_500_that_invites_no_third_try():
    status, headers, body, _, seen = call([("died", 0.0)] * 3, deadline_s=5.0)
    assert len(seen) == 2
    assert status == 500 and b"retry-after" not in headers, (status, headers)
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("server_error", "replicas_failed")
    assert "two replicas" in error["message"] and "not sent again" in error["message"]


def test_the_proxy_reads_request_timeout_s_from_the_environment_sida_serve_gives_it(monkeypatch, demo_dir):
    settings = Settings(model_dir=demo_dir, request_timeout_s=12.5)
    env = ray_serve.proxy_env(settings)
    assert env[ray_serve.PROXY_CALLBACK_ENV] == ray_serve.PROXY_CALLBACK
    monkeypatch.setenv(ray_serve.DEADLINE_ENV, env[ray_serve.DEADLINE_ENV])
    (middleware,) = ray_serve.proxy_middlewares()
    assert middleware.kwargs["deadline_s"] == 12.5
    monkeypatch.delenv(ray_serve.DEADLINE_ENV)
    (middleware,) = ray_serve.proxy_middlewares()  # unset (a KubeRay pod): the settings' default
    assert middleware.kwargs["deadline_s"] == Settings.model_fields["request_timeout_s"].default
