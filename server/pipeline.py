"""The serving pipeline: a bounded intake, the predictor worker's thread (batches requests, builds hash table
i+1) and the single inference worker's thread (owns the model and the expert cache, runs batch i).

   submit_many() ──▶ intake queue ──▶ PredictorWorker.step: Batcher → pad → HashTable ──▶ hash queue (depth 1)
                                                          ──▶ InferenceWorker.step: run → futures
"""

from __future__ import annotations

import queue
import threading
import time

from sida.server.batcher import Batcher
from sida.server.request import QueueFull, Request
from sida.server.workers import InferenceWorker, PredictorWorker, set_thread_count

_STOP = object()


class Pipeline:
    """Owns the queues and the two worker threads; the HTTP layer only calls `submit_many`, `start` and `stop`."""

    def __init__(
        self,
        runner,
        metrics,
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        hash_depth: int = 1,  # batch i+1 is hashed while batch i runs (paper §3.2)
        shadow_sample_rate: float = 0.0,
        threads: tuple[int | None, int | None] = (None, None),  # torch threads of (inference, predictor) workers
    ):
        self.metrics = metrics
        self.max_queue = max_queue
        batcher = Batcher(max_batch_size, max_batch_tokens, max_wait_s)
        self.predictor = PredictorWorker(runner, batcher, metrics, self._left_queue)
        self.inference = InferenceWorker(runner, metrics, self._left_queue, shadow_sample_rate)
        self._intake: queue.Queue = queue.Queue()
        self._hashed: queue.Queue = queue.Queue(maxsize=hash_depth)
        self._pending = 0  # accepted and not yet started
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._inference_threads, self._predictor_threads = threads

    # ------------------------------------------------------------------ intake (event-loop side)

    def submit_many(self, reqs: list[Request]) -> None:
        """Accept all of a call's requests or none of them (QueueFull)."""
        with self._lock:
            if self._pending + len(reqs) > self.max_queue:
                raise QueueFull
            self._pending += len(reqs)
        self.metrics.queue_depth.set(self._pending)
        for r in reqs:
            self._intake.put(r)

    @property
    def pending(self) -> int:
        """Accepted requests not yet started."""
        return self._pending

    def start(self) -> None:
        """Start both worker threads."""
        for target, name in ((self._predictor_loop, "sida-predictor"), (self._inference_loop, "sida-inference")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Finish everything accepted, then stop both workers."""
        self._intake.put(_STOP)
        for t in self._threads:
            t.join()

    def _left_queue(self, req: Request) -> None:
        with self._lock:
            self._pending -= 1
        self.metrics.queue_depth.set(self._pending)

    # ------------------------------------------------------------------ worker threads

    def _predictor_loop(self) -> None:
        set_thread_count(self._predictor_threads)
        stopping = False
        while True:
            # A hashed batch already waits for the inference worker: a batch cut now could not start any sooner,
            # so keep collecting (it grows fuller) and look again for room every few milliseconds.
            room = self._hashed.maxsize - self._hashed.qsize()
            timeout = self.predictor.batcher.time_to_next(time.monotonic())
            if room < 1 and timeout is not None:
                timeout = max(timeout, 0.002)
            arrived = self._take_arrived(timeout if not stopping else 0)
            if _STOP in arrived:
                stopping = True
                arrived = [r for r in arrived if r is not _STOP]
            if room < 1 and not stopping:
                self.predictor.step(arrived, time.monotonic(), room=0)
                continue
            for batch in self.predictor.step(arrived, time.monotonic(), None if stopping else room, stopping):
                self._hashed.put(batch)
                self.metrics.hash_queue_depth.set(self._hashed.qsize())
            if stopping and len(self.predictor.batcher) == 0 and self._intake.empty():
                self._hashed.put(_STOP)
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
        set_thread_count(self._inference_threads)
        while True:
            batch = self._hashed.get()
            self.metrics.hash_queue_depth.set(self._hashed.qsize())
            if batch is _STOP:
                return
            self.inference.step(batch, time.monotonic())
