"""The deadline on a request's head (server/head_timeout.py), on both of uvicorn's HTTP protocol classes: it reads
their `cycle` and `transport`, so a uvicorn that moves them fails here."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sida.server.app import app_from_settings
from sida.server.cli import uvicorn_config
from sida.server.head_timeout import head_timeout_protocol
from sida.server.settings import load_settings
from tests.server.test_overload import running

TIMEOUT_S = 0.5
PARTIAL_HEAD = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n"  # no blank line: the head never ends
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def hello(scope, receive, send):
    """A plain ASGI app: 200 "ok" to every request."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the test fails if it does not, in 10 s)."""
    s.settimeout(10)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def assert_408(raw: bytes) -> None:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), raw
    assert b"connection: close" in head.lower()
    err = json.loads(body)["error"]
    assert err["code"] == "head_timeout" and err["type"] == "invalid_request_error" and "param" in err


@pytest.fixture(params=[H11Protocol, HttpToolsProtocol], ids=["h11", "httptools"])
def port(request) -> Iterator[int]:
    with running(hello, http=head_timeout_protocol(TIMEOUT_S, request.param)) as base:
        yield int(base.rsplit(":", 1)[1])


def test_a_head_that_never_ends_gets_408_and_is_closed_while_others_are_served(port):
    with socket.create_connection(("127.0.0.1", port)) as slow:
        t0 = time.monotonic()
        slow.sendall(PARTIAL_HEAD)
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "ok"  # not held up by the slow one
        time.sleep(TIMEOUT_S / 2)
        slow.sendall(b"X-Trickle: 1\r\n")  # a byte now and then does not move the deadline
        assert_408(read_all(slow))
        assert TIMEOUT_S * 0.9 < time.monotonic() - t0 < TIMEOUT_S + 3


def test_a_connection_that_sends_nothing_is_closed(port):
    with socket.create_connection(("127.0.0.1", port)) as idle:
        assert_408(read_all(idle))


def test_on_a_kept_alive_connection_the_next_head_has_its_own_deadline(port):
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(REQUEST)
        c.settimeout(10)
        assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(TIMEOUT_S * 1.5)  # past the first deadline: the answered request disarmed it
        c.sendall(REQUEST)
        assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
        c.sendall(PARTIAL_HEAD)
        assert_408(read_all(c))


def test_sida_serve_runs_uvicorn_with_its_head_timeout_and_counts_each_one(demo_dir):
    settings = load_settings(head_timeout_s=TIMEOUT_S, mode="exact", budget_experts=8, torch_threads=1)
    app = app_from_settings(settings)
    config = uvicorn_config(app, settings)
    config.load()
    assert config.http_protocol_class is config.http and issubclass(config.http, AutoHTTPProtocol)
    with running(app, http=config.http) as base:
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as slow:
            t0 = time.monotonic()
            slow.sendall(PARTIAL_HEAD)
            assert_408(read_all(slow))
            assert time.monotonic() - t0 < TIMEOUT_S + 3  # the settings' deadline, not the default 10 s
        metrics = httpx.get(f"{base}/metrics").text
    assert 'sida_requests_total{endpoint="unmatched",status="408"} 1.0' in metrics
