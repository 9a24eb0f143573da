"""What the HTTP layer shares: the serving options (fixed at build time) and what the lifespan's setup built."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sida.offload.contracts import ServingRunner
    from sida.server.metrics import Metrics
    from sida.server.pipeline import Pipeline


@dataclass(frozen=True)
class ServeOptions:
    """The settings the handlers and the middleware read."""

    model_name: str
    max_input_tokens: int
    request_timeout_s: float
    max_body_bytes: int
    api_key: str | None
    body_timeout_s: float  # a request body not in within this is answered 408
    drain_timeout_s: float = 65.0  # how long a stop waits for accepted requests (Settings.drain_timeout_s)


class State:
    """`app.state.sida`: the options, then the runner, pipeline and metrics once setup has run (None before).

    `ready` is true between the end of setup and the start of a drain, unless a worker has failed. The flags
    are plain attributes: a signal handler and a dying worker thread set them, the handlers read them.
    """

    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.ready = False
        self.draining = False
        self.failure: str | None = None  # why a worker stopped: the process exits, non-zero, for a restart
        self.runner: ServingRunner | None = None
        self.pipeline: Pipeline | None = None
        self.metrics: Metrics | None = None
        self.info: dict = {}
        self.drain_deadline: float | None = None  # monotonic time the drain gives up on accepted requests

    def begin_drain(self, deadline: float | None = None) -> None:
        """Stop taking requests (readiness and new `/v1/` calls answer 503); those accepted are still answered,
        until `deadline` (default: `drain_timeout_s` from now)."""
        if self.drain_deadline is None:
            self.drain_deadline = deadline if deadline is not None else time.monotonic() + self.opts.drain_timeout_s
        self.draining = True
        self.ready = False

    @property
    def fault(self) -> str | None:
        """Why a running server cannot serve now, though no worker has stopped: an inference step stuck past the
        watchdog's limit, or an expert file the engine could not repair. Readiness answers 503 with it."""
        stuck = getattr(self.pipeline, "stuck", None)
        if stuck is not None:
            return stuck
        engine = getattr(self.runner, "engine", None)
        return getattr(engine, "fault", None)

    def fail(self, reason: str) -> None:
        """A worker stopped: readiness answers 503 with `reason` until the process has exited."""
        self.failure = reason
        self.ready = False

    @property
    def drained(self) -> bool:
        """Every request the pipeline accepted has been answered."""
        return self.pipeline is None or self.pipeline.unanswered == 0
