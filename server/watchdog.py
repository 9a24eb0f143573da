"""The inference step's watchdog: a step (a batch, a prefill or a decode step) that runs past a limit is noticed.

Nothing in the inference thread can time out a read that hangs (a failing disk in uninterruptible sleep, a network
filesystem, a wedged GPU): the thread cannot be interrupted. So a monitor thread watches it from outside. A step
past the limit is counted once (`sida_stuck_steps_total`), logged once with the stuck thread's stack, and makes
`stuck` a one-line reason: readiness answers 503 with it, `/info` shows it, and Ray's health check replaces the
replica. A stuck step that ends after all clears `stuck`.

The limit is `step_timeout_s` where set; otherwise the larger of `floor_s` (the request deadline: a step longer
than that answers every request in it 504 anyway) and `margin` × the slowest step measured so far.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("sida")


class StepWatchdog:
    """`with watchdog.step("decode"):` around each step of the watched thread; `start()` runs the monitor."""

    def __init__(
        self,
        limit_s: float | None,
        floor_s: float,
        margin: float = 5.0,
        on_stuck=None,  # called with no argument, once per stuck step (the metrics counter's `inc`)
        clock=time.monotonic,
    ):
        self.fixed_limit_s = limit_s
        self.floor_s = floor_s
        self.margin = margin
        self.on_stuck = on_stuck
        self.clock = clock
        self.slowest_s = 0.0
        self.stuck_steps = 0
        self.stuck: str | None = None  # why readiness is 503: the step running past the limit, while it runs
        self._step: tuple[str, float] | None = None  # (name, start) of the step running now
        self._thread_id: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def limit_s(self) -> float:
        if self.fixed_limit_s is not None:
            return self.fixed_limit_s
        return max(self.floor_s, self.margin * self.slowest_s)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = self.clock()
        with self._lock:
            self._step = (name, start)
            self._thread_id = threading.get_ident()
        try:
            yield
        finally:
            elapsed = self.clock() - start
            with self._lock:
                self._step = None
                self.slowest_s = max(self.slowest_s, elapsed)
                if self.stuck is not None:
                    log.warning("the stuck %s step ended after %.1f s; ready again", name, elapsed)
                    self.stuck = None

    def check(self) -> str | None:
        """Look at the running step now: the first look past the limit counts it, logs the stack and sets
        `stuck`; returns `stuck`."""
        with self._lock:
            if self._step is None or self.stuck is not None:
                return self.stuck
            name, start = self._step
            running_s, limit_s = self.clock() - start, self.limit_s
            if running_s <= limit_s:
                return None
            self.stuck = f"the inference {name} step has run {running_s:.0f} s (limit {limit_s:.0f} s)"
            self.stuck_steps += 1
            thread_id = self._thread_id
        log.error("%s; its thread is at:\n%s", self.stuck, self.stack(thread_id))
        if self.on_stuck is not None:
            self.on_stuck()
        return self.stuck

    @staticmethod
    def stack(thread_id: int | None) -> str:
        frame = sys._current_frames().get(thread_id) if thread_id is not None else None
        return "".join(traceback.format_stack(frame)) if frame is not None else "(the thread has ended)"

    def summary(self) -> dict:
        return {"limit_s": round(self.limit_s, 3), "slowest_s": round(self.slowest_s, 3), "stuck": self.stuck}

    def start(self, poll_s: float = 0.5) -> None:
        self._monitor = threading.Thread(target=self._run, args=(poll_s,), name="sida-watchdog", daemon=True)
        self._monitor.start()

    def stop(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join()

    def _run(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            self.check()
