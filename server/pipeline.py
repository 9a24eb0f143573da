"""The serving pipeline: a bounded intake, the predictor worker (batches requests, builds hash table i+1) and
the single inference worker (owns the model and the expert cache, runs batch i).

   submit() ──▶ intake queue ──▶ PredictorWorker: Batcher → pad → HashTable ──▶ hash queue (depth 1)
                                                                       ──▶ InferenceWorker: run → futures
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from sida.server.batcher import Batcher
from sida.server.request import DeadlineExceeded, QueueFull, Request, resolve_all

_STOP = object()


@dataclass
class _Batch:
    requests: list[Request]
    enc: dict[str, torch.Tensor]
    table: Any
    hash_seconds: float
    ready: Any = None  # CUDA event recorded after the table was built on the predictor's stream


def set_thread_count(n: int | None) -> None:
    """This OS thread's torch intra-op thread count (each thread has its own). torch gives a thread its count on
    first use, copied from whichever thread set one last, so that happens first: else the other worker's later
    `set_num_threads` would become this thread's count."""
    if n:
        torch.get_num_threads()
        torch.set_num_threads(n)


class Pipeline:
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
        self.runner = runner
        self.metrics = metrics
        self.batcher = Batcher(max_batch_size, max_batch_tokens, max_wait_s)
        self.max_queue = max_queue
        self._intake: queue.Queue = queue.Queue()
        self._hashed: queue.Queue = queue.Queue(maxsize=hash_depth)
        self._pending = 0  # accepted and not yet started
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._shadow_rate = shadow_sample_rate
        self._inference_threads, self._predictor_threads = threads
        self._batches = 0
        self.error: BaseException | None = None
        device = runner.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

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
        return self._pending

    def start(self) -> None:
        for target, name in ((self._predictor_loop, "sida-predictor"), (self._inference_loop, "sida-inference")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Finish everything accepted, then stop both workers."""
        self._intake.put(_STOP)
        for t in self._threads:
            t.join()

    def _started(self, req: Request) -> None:
        with self._lock:
            self._pending -= 1
        self.metrics.queue_depth.set(self._pending)

    # ------------------------------------------------------------------ predictor worker

    def _predictor_loop(self) -> None:
        set_thread_count(self._predictor_threads)
        stopping = False
        while True:
            # A hashed batch already waits for the inference worker: a batch cut now could not start any sooner,
            # so keep collecting (it grows fuller) and look again for room every few milliseconds.
            busy = self._hashed.full()
            timeout = self.batcher.time_to_next(time.monotonic())
            if busy and timeout is not None:
                timeout = max(timeout, 0.002)
            try:
                item = self._intake.get(timeout=timeout) if not stopping else self._intake.get_nowait()
            except queue.Empty:
                item = None
            if item is _STOP:
                stopping = True
            elif item is not None:
                self.batcher.add(item, item.key, len(item.ids), item.arrival)
                if not self._intake.empty():  # take in everything that has arrived before batching
                    continue
            if busy and not stopping:
                continue
            while (batch := self.batcher.pop_ready(time.monotonic(), flush=stopping)) is not None:
                self._hash(batch)
                if self._hashed.full() and not stopping:
                    break
            if stopping and len(self.batcher) == 0 and self._intake.empty():
                self._hashed.put(_STOP)
                return

    def _hash(self, requests: list[Request]) -> None:
        live = self._drop_expired(requests)
        if not live:
            return
        enc = self.runner.pad([r.ids for r in live])
        t0 = time.perf_counter()
        start = self.runner.loaded.decoder_start_ids(len(live), self.runner.device)
        ready = None
        if self._stream is not None:  # on its own CUDA stream, so it never queues behind batch i's kernels
            with torch.cuda.stream(self._stream):
                table = self.runner.hash_table(enc, start)
                ready = torch.cuda.Event()
                ready.record(self._stream)
        else:
            table = self.runner.hash_table(enc, start)
        seconds = time.perf_counter() - t0
        if table is not None:
            self.metrics.hash_build_seconds.observe(seconds)
        self._hashed.put(_Batch(live, enc, table, seconds, ready))
        self.metrics.hash_queue_depth.set(self._hashed.qsize())

    def _drop_expired(self, requests: list[Request]) -> list[Request]:
        now = time.monotonic()
        live = []
        for r in requests:
            if now > r.deadline:
                self._started(r)
                r.resolve(error=DeadlineExceeded("the request's deadline passed before it was started"))
            else:
                live.append(r)
        return live

    # ------------------------------------------------------------------ inference worker

    def _inference_loop(self) -> None:
        set_thread_count(self._inference_threads)
        while True:
            item = self._hashed.get()
            self.metrics.hash_queue_depth.set(self._hashed.qsize())
            if item is _STOP:
                return
            live = self._drop_expired(item.requests)
            if len(live) != len(item.requests):  # rebuild the batch without the dropped rows
                keep = [i for i, r in enumerate(item.requests) if r in live]
                item.enc = {k: v[keep] for k, v in item.enc.items()}
                if item.table is not None:
                    item.table = item.table.select_rows(keep)
            if not live:
                continue
            try:
                self._run(live, item)
            except Exception as e:  # noqa: BLE001 — one failing batch must not kill the server
                self.error = e
                self.metrics.batch_errors.inc()
                for r in live:
                    r.resolve(error=e)

    def _run(self, requests: list[Request], batch: _Batch) -> None:
        now = time.monotonic()
        for r in requests:
            r.started = now
            self._started(r)
            self.metrics.queue_wait_seconds.observe(now - r.arrival)
        self.metrics.observe_batch(len(requests), int(batch.enc["attention_mask"].sum()))
        self._batches += 1
        if batch.ready is not None:  # the compute stream waits for the table's kernels, the host does not
            torch.cuda.current_stream(self.runner.device).wait_event(batch.ready)
        engine = self.runner.engine
        if engine is not None:
            engine.context.shadow = (
                self._shadow_rate > 0 and (self._batches * self._shadow_rate) % 1 < self._shadow_rate
            )
        first = requests[0]
        if first.kind == "classify":
            results = self.runner.classify_ids(batch.enc, first.params["task"], hash_table=batch.table)
        else:
            p = first.params
            on_text = None
            if any(r.on_text is not None for r in requests):

                def on_text(row: int, delta: str) -> None:
                    if requests[row].on_text is not None:
                        requests[row].on_text(delta)

            results = self.runner.complete_ids(
                batch.enc,
                p["max_tokens"],
                p["temperature"],
                p["top_p"],
                p["seed"],
                p["stops"],
                on_text,
                hash_table=batch.table,
            )
        resolve_all(requests, results)
