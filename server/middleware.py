"""`Guard`: the checks every request passes before a handler, and the request metrics after it.

It is pure ASGI rather than Starlette's `@app.middleware("http")`, whose per-request cost is about that of the
rest of a classify call.
"""

from __future__ import annotations

import hmac
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sida.server.errors import APIError, envelope
from sida.server.state import State


class Guard:
    """Body size (413), API key on `/v1/` (401), readiness for `/v1/` POSTs (503), then
    `sida_requests_total` and `sida_request_duration_seconds` for every `/v1/` request."""

    def __init__(self, app: ASGIApp, state: State):
        self.inner = app
        self.state = state
        self.opts = state.opts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            err = self.refuse(scope, path)
            if err is not None:
                await envelope(err)(scope, receive, send_status)
            else:
                await self.inner(scope, receive, send_status)
        finally:
            metrics = self.state.metrics
            if metrics is not None and path.startswith("/v1/"):
                metrics.requests.labels(path, str(status)).inc()
                metrics.request_duration.labels(path).observe(time.perf_counter() - t0)

    def refuse(self, scope: Scope, path: str) -> APIError | None:
        """The error to answer instead of calling the app, or None to let the request through."""
        opts = self.opts
        headers = Headers(scope=scope)
        if scope["method"] == "POST":
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > opts.max_body_bytes:
                return APIError(413, f"request body over {opts.max_body_bytes} bytes", "invalid_request_error")
        if path.startswith("/v1/") and opts.api_key is not None:
            auth = headers.get("authorization", "")
            token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), opts.api_key.encode()):
                return APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
        if path.startswith("/v1/") and scope["method"] == "POST" and not self.state.ready:
            return APIError(503, "server is starting or draining", "service_unavailable", headers={"Retry-After": "1"})
        return None
