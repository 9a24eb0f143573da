"""A deadline on a request's head (request line and headers), which uvicorn does not have.

uvicorn times out an idle keep-alive connection, but a connection that opens and never sends a whole head (or
sends it a byte at a time) is held for ever: enough of them use up the process's file descriptors and the server
stops accepting (slowloris). `head_timeout_protocol` gives uvicorn's HTTP protocol class a deadline like nginx's
`client_header_timeout`: counted from the connection's start, or from the first byte of the next request on a
kept-alive connection, and not moved by later bytes. Past it the client gets a 408 envelope and the connection
is closed. The body has its own deadline (`Guard`, `body_timeout_s`).

It reads two attributes both of uvicorn's protocol classes (h11 and httptools) have: `cycle`, the current
request's cycle (None before the first head), and `transport`. tests/server/test_head_timeout.py runs both.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from sida.server.errors import error_body

log = logging.getLogger(__name__)


def timeout_response(timeout_s: float) -> bytes:
    """The raw 408 response sent when a head is not in within `timeout_s`."""
    body = json.dumps(
        error_body(f"request head not received within {timeout_s:g} s", "invalid_request_error", None, "head_timeout")
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def head_timeout_protocol(
    timeout_s: float, base: type[asyncio.Protocol] = AutoHTTPProtocol, on_timeout: Callable[[], None] | None = None
) -> type:
    """`base` (uvicorn's HTTP protocol class; the one uvicorn's "auto" picks by default) with a deadline of
    `timeout_s` on each request's head; pass it as `uvicorn.Config(http=...)`. `on_timeout()` is called for each
    connection closed by it (in the event loop)."""
    response = timeout_response(timeout_s)

    class HeadTimeout(base):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._waiting_for_head():
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = asyncio.get_running_loop().call_later(timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self) -> None:
            self._deadline = None
            if self._waiting_for_head() and not self.transport.is_closing():
                log.info("closed a connection whose request head was not in within %g s", timeout_s)
                self.transport.write(response)
                self.transport.close()
                if on_timeout is not None:
                    on_timeout()

    return HeadTimeout
