"""`Guard`: the checks every request passes before a handler, and the request metrics after it.

It is pure ASGI rather than Starlette's `@app.middleware("http")`, whose per-request cost is about that of the
rest of a classify call.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sida.server.errors import APIError, envelope, invalid, unavailable
from sida.server.state import State

UNMATCHED = "unmatched"  # the endpoint label of every path no route serves: one series, not one per path
CLIENT_LEFT = 499  # the status counted when the client disconnects before its body is in (nginx's)
CLOSE = {"Connection": "close"}  # a body refused before its end leaves the rest unread: the connection cannot be reused


class Guard:
    """Body size by `content-length` (413), API key on `/v1/` (401), readiness for `/v1/` POSTs (503), then a
    POST's whole body, read before any handler runs: over `max_body_bytes` (413, chunked bodies too) or not in
    within `body_timeout_s` of the request's start (408: a client that never finishes its body is cut off).
    After the response, `sida_requests_total` and `sida_request_duration_seconds` by endpoint (one of the app's
    route paths, `endpoints`, else UNMATCHED) and status."""

    def __init__(
        self,
        app: ASGIApp,
        state: State,
        endpoints: frozenset[str] = frozenset(),
    ):
        self.inner = app
        self.state = state
        self.opts = state.opts
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            err = self.refuse(scope)
            if err is None and scope["method"] == "POST":
                body, err = await self.read_body(receive)
                if err is None:
                    if body is None:
                        status = CLIENT_LEFT
                        return
                    receive = replay(body, receive)
            if err is not None:
                await envelope(err)(scope, receive, send_status)
            else:
                await self.inner(scope, receive, send_status)
        finally:
            metrics = self.state.metrics
            if metrics is not None:
                endpoint = scope["path"] if scope["path"] in self.endpoints else UNMATCHED
                metrics.requests.labels(endpoint, str(status)).inc()
                metrics.request_duration.labels(endpoint).observe(time.perf_counter() - t0)

    def refuse(self, scope: Scope) -> APIError | None:
        """The error to answer instead of reading the body and calling the app, or None to go on."""
        opts, path = self.opts, scope["path"]
        headers = Headers(scope=scope)
        if scope["method"] == "POST":
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > opts.max_body_bytes:
                return too_large(opts.max_body_bytes)
        if path.startswith("/v1/") and opts.api_key is not None:
            auth = headers.get("authorization", "")
            token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), opts.api_key.encode()):
                return APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
        if path.startswith("/v1/") and scope["method"] == "POST":
            if not self.state.ready:
                return unavailable("server is starting or draining")
            # a stuck step: a new call would only wait for its deadline (an expert that cannot be repaired fails only
            # the batches that need it, so calls are still taken; readiness says it)
            if (stuck := getattr(self.state.pipeline, "stuck", None)) is not None:
                return unavailable(f"server cannot serve: {stuck}", code="fault")
        return None

    async def read_body(self, receive: Receive) -> tuple[bytes | None, APIError | None]:
        """(the whole body, None), or (None, the error to answer), or (None, None) when the client left."""
        limit = self.opts.max_body_bytes
        deadline = time.monotonic() + self.opts.body_timeout_s
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                err = invalid(
                    f"request body not received within {self.opts.body_timeout_s} s", code="body_timeout", status=408
                )
                err.headers = CLOSE
                return None, err
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None, too_large(limit)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), None


def too_large(limit: int) -> APIError:
    """413 for a body over `limit` bytes."""
    err = invalid(f"request body over {limit} bytes", code="body_too_large", status=413)
    err.headers = CLOSE
    return err


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body already read, then passes on what the client sends next (its
    disconnect, which a streaming response listens for)."""
    first: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> Message:
        return first.pop() if first else await receive()

    return receive_again
