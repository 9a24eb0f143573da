"""A request as the workers see it (no wire types): token ids, batching key, deadline, and the future its HTTP
handler awaits on the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


class KVCacheTooSmall(Exception):
    """A request's prompt and max_tokens need more KV cache than the whole bound: it could never run (400)."""


class PipelineFailed(Exception):
    """A worker thread stopped: this process cannot answer the request (a restart is due); the message says why."""


@dataclass(eq=False)
class Request:
    kind: str  # "classify" | "complete"
    ids: list[int]
    key: tuple  # compatibility: requests with equal keys may share a batch
    params: dict[str, Any]
    deadline: float  # time.monotonic() after which the answer is useless
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    on_text: Callable[[str], None] | None = None  # streaming, called from the inference thread
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        """Answer the awaiting handler (from any thread)."""
        self.loop.call_soon_threadsafe(self._settle, result, error)

    def _settle(self, result, error: BaseException | None) -> None:  # on the request's event loop
        if not self.future.done():
            self.future.set_exception(error) if error is not None else self.future.set_result(result)


def resolve_all(requests: list[Request], results: list) -> None:
    """`r.resolve(result)` for each, with one wake-up of each event loop instead of one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Any]]] = {}
    for r, res in zip(requests, results):
        by_loop.setdefault(r.loop, []).append((r, res))

    def settle_all(pairs) -> None:
        for r, res in pairs:
            r._settle(res, None)

    for loop, pairs in by_loop.items():
        loop.call_soon_threadsafe(settle_all, pairs)
