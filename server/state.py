"""What the HTTP layer shares: the serving options (fixed at build time) and what the lifespan's setup built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


class State:
    """`app.state.sida`: the options, then the runner, pipeline and metrics once setup has run (None before)."""

    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.ready = False
        self.draining = False
        self.runner: Any = None
        self.pipeline: Pipeline | None = None
        self.metrics: Metrics | None = None
        self.info: dict = {}
