"""The serving pipeline: a bounded intake, the batch worker's thread (batches requests, builds hash table i+1)
and the single inference worker's thread (owns the model and the expert cache, runs batch i; under continuous
batching it takes new batches between the running batch's decode steps, `DecodeWorker`).

   submit_many() ──▶ intake queue ──▶ BatchWorker.step: Batcher → pad → HashTable ──▶ hash queue (depth 1)
                                                      ──▶ InferenceWorker.step: run → futures

A batch's error stays in the worker (workers.py). A worker thread that ends anyway (an error outside any batch, a
BaseException) fails the pipeline: every accepted request still waiting is answered 503 at once, later calls are
refused, the other worker returns, and `on_failure` tells the server, which turns unready and exits non-zero.
`PipelineFailed` is a plain exception: the HTTP layer (errors.py) answers it. A step of the inference worker that
never ends cannot be interrupted: the watchdog (watchdog.py) notices it, and `stop` is bounded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

from sida.offload.contracts import ServingRunner
from sida.server.batcher import Batcher
from sida.server.decode_worker import DecodeWorker
from sida.server.request import PipelineFailed, QueueFull, Request
from sida.server.watchdog import StepWatchdog
from sida.server.workers import BatchWorker, InferenceWorker, set_torch_threads

log = logging.getLogger("sida")

_STOP = object()
_POLL_S = 0.1  # how often a worker blocked on the hash queue looks whether the pipeline has failed


class Pipeline:
    """Owns the queues and the two worker threads; the HTTP layer only calls `submit_many`, `start` and `stop`."""

    def __init__(
        self,
        runner: ServingRunner,
        metrics,
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        hash_depth: int = 1,  # batch i+1 is hashed while batch i runs (paper §3.2)
        shadow_sample_rate: float = 0.0,
        torch_threads: tuple[int | None, int | None] = (None, None),  # of the (inference, batch) workers
        watchdog: StepWatchdog | None = None,  # watches the inference worker's steps (server/watchdog.py)
    ):
        self.metrics = metrics
        self.max_queue = max_queue
        batcher = Batcher(max_batch_size, max_batch_tokens, max_wait_s)
        self.batch_worker = BatchWorker(runner, batcher, metrics, self._left_queue)
        self.inference_worker = InferenceWorker(runner, metrics, self._left_queue, shadow_sample_rate)
        decode = runner.decode_batch
        self.decode_worker = DecodeWorker(self.inference_worker, decode) if decode is not None else None
        self._intake: queue.Queue = queue.Queue()
        self._hashed: queue.Queue = queue.Queue(maxsize=hash_depth)
        self._queue_depth = 0  # accepted and not yet started
        self._open: set[Request] = set()  # accepted and not yet answered
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._inference_torch_threads, self._batch_torch_threads = torch_threads
        self.failure: str | None = None  # why a worker thread stopped, once one has
        self.on_failure: Callable[[str], None] | None = None  # called with `failure`, from the dying thread
        self.watchdog = watchdog

    # ------------------------------------------------------------------ intake (event-loop side)

    def submit_many(self, reqs: list[Request]) -> None:
        """Accept all of a call's requests or none of them (QueueFull; PipelineFailed once a worker has stopped).
        Called on the requests' event loop."""
        with self._lock:
            if self.failure is not None:
                raise PipelineFailed(self.failure)
            if self._queue_depth + len(reqs) > self.max_queue:
                raise QueueFull
            self._queue_depth += len(reqs)
            self._open.update(reqs)
        for r in reqs:
            r.future.add_done_callback(partial(self._answered, r))
        self._queue_gauges()
        for r in reqs:
            self._intake.put(r)

    @property
    def queue_depth(self) -> int:
        """Accepted requests not yet started."""
        return self._queue_depth

    @property
    def unanswered(self) -> int:
        """Accepted requests not yet answered (started or not)."""
        return len(self._open)

    @property
    def stuck(self) -> str | None:
        """Why the inference worker is stuck (a step past the watchdog's limit), while it is."""
        return self.watchdog.stuck if self.watchdog is not None else None

    def start(self) -> None:
        """Start both worker threads (and the watchdog's monitor)."""
        for target, name in ((self._batch_loop, "batch"), (self._inference_loop, "inference")):
            t = threading.Thread(target=self._guard, args=(target, name), name=f"sida-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.watchdog is not None:
            self.watchdog.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Finish everything accepted, then stop both workers (at once if one has failed). False if a worker still
        runs after `timeout` seconds (a stuck step: its thread cannot be interrupted, and is left to the process's
        exit)."""
        self._intake.put(_STOP)
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self.watchdog is not None:
            self.watchdog.stop()
        return not any(t.is_alive() for t in self._threads)

    def _watched(self, name: str):
        return self.watchdog.step(name) if self.watchdog is not None else nullcontext()

    def _answered(self, req: Request, _future) -> None:
        with self._lock:
            self._open.discard(req)

    def _left_queue(self, req: Request) -> None:
        with self._lock:
            self._queue_depth -= 1
        self._queue_gauges()

    def _queue_gauges(self) -> None:
        self.metrics.queue_depth.set(self._queue_depth)
        self.metrics.waiting.set(self._queue_depth)  # vLLM's name for the same count

    # ------------------------------------------------------------------ worker threads

    def _guard(self, loop: Callable[[], None], name: str) -> None:
        """Run a worker's loop; if it ends by an exception, fail the pipeline rather than leave requests waiting."""
        try:
            loop()
        except BaseException as e:  # noqa: BLE001 — any end of a worker but a return is a failure
            self._fail(f"the {name} worker stopped: {type(e).__name__}: {e}", e)

    def _fail(self, reason: str, error: BaseException) -> None:
        """Answer every accepted request 503 now, refuse new ones, wake the other worker so that it returns."""
        log.critical("%s; the process must be restarted", reason, exc_info=error)
        with self._lock:
            self.failure = reason
            stranded = list(self._open)
        for r in stranded:
            r.resolve(error=PipelineFailed(reason))
        self._intake.put(_STOP)
        if self.on_failure is not None:
            self.on_failure(reason)

    def _batch_loop(self) -> None:
        set_torch_threads(self._batch_torch_threads)
        stopping = False
        while self.failure is None:
            # A hashed batch already waits for the inference worker: a batch cut now could not start any sooner,
            # so keep collecting (it grows fuller) and look again for room every few milliseconds.
            room = self._hashed.maxsize - self._hashed.qsize()
            timeout = self.batch_worker.batcher.time_to_next(time.monotonic())
            if room < 1 and timeout is not None:
                timeout = max(timeout, 0.002)
            arrived = self._take_arrived(timeout if not stopping else 0)
            if self.failure is not None:  # woken by the other worker's failure: its requests are answered
                return
            if _STOP in arrived:
                stopping = True
                arrived = [r for r in arrived if r is not _STOP]
            if room < 1 and not stopping:
                self.batch_worker.step(arrived, time.monotonic(), room=0)
                continue
            for batch in self.batch_worker.step(arrived, time.monotonic(), None if stopping else room, stopping):
                self._hand_over(batch)
            if stopping and len(self.batch_worker.batcher) == 0 and self._intake.empty():
                self._hand_over(_STOP)
                return

    def _hand_over(self, item) -> None:
        """Put `item` on the hash queue, waiting for room; dropped once the pipeline has failed (its requests
        were answered then)."""
        while self.failure is None:
            try:
                self._hashed.put(item, timeout=_POLL_S)
            except queue.Full:
                continue
            self.metrics.hash_queue_depth.set(self._hashed.qsize())
            return

    def _take_arrived(self, timeout: float | None) -> list:
        """Everything in the intake now, waiting up to `timeout` seconds (None: forever) for the first item."""
        try:
            items = [self._intake.get(timeout=timeout) if timeout != 0 else self._intake.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._intake.get_nowait())
            except queue.Empty:
                return items

    def _inference_loop(self) -> None:
        set_torch_threads(self._inference_torch_threads)
        decode = self.decode_worker
        stopping = False
        while self.failure is None:
            busy = decode is not None and decode.busy
            if not (stopping and busy):
                try:  # while sequences run, new batches are taken between decode steps, never waited for
                    batch = self._hashed.get_nowait() if busy else self._hashed.get(timeout=_POLL_S)
                except queue.Empty:
                    batch = None
                if batch is not None:
                    self.metrics.hash_queue_depth.set(self._hashed.qsize())
                    if batch is _STOP:
                        stopping = True
                    elif decode is not None:
                        with self._watched("batch"):
                            decode.add(batch, time.monotonic())
                    else:
                        with self._watched("batch"):
                            self.inference_worker.step(batch, time.monotonic())
            if decode is not None and decode.busy:
                with self._watched("decode"):
                    decode.step(time.monotonic())
            elif stopping:
                return
