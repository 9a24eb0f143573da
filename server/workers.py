"""The two workers of the serving pipeline, each a `step()` that a test can call with a fake runner and clock.

- `BatchWorker.step(arrived, now, room)`: batches accepted requests (the `Batcher` policy), drops the
  expired, pads each batch and builds its hash table ahead of inference (batch i+1 while batch i runs).
- `InferenceWorker.step(batch, now)`: the only caller of the model: runs a hashed batch (classification or
  completion) and answers its requests.

An exception while a worker prepares or runs a batch fails only that batch's requests; it is logged with its
traceback and counted in `sida_batch_errors_total{stage}` (`predict`: the batch worker's, `infer`: the inference
worker's), and the worker goes on.
Threads and queues are the pipeline's (`server/pipeline.py`); nothing here blocks or sleeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sida.offload.contracts import ServingRunner
from sida.offload.hash_table import HashTable
from sida.offload.runner import Encoded
from sida.server.batcher import Batcher
from sida.server.request import DeadlineExceeded, Request, resolve_all

log = logging.getLogger("sida")


@dataclass
class HashedBatch:
    """A batch ready for inference: its requests, their padded ids and the batch's hash table."""

    requests: list[Request]
    enc: Encoded  # input_ids, attention_mask [batch, seq]
    table: HashTable | None
    hash_seconds: float
    table_event: Any = None  # CUDA event recorded after the table was built on the batch worker's stream

    def keep(self, rows: list[int]) -> HashedBatch:
        """The same batch with only the sequences `rows` (the others' deadline passed)."""
        table = self.table.select_sequences(rows) if self.table is not None else None
        enc = {k: v[rows] for k, v in self.enc.items()}
        return HashedBatch([self.requests[i] for i in rows], enc, table, self.hash_seconds, self.table_event)


def drop_expired(requests: list[Request], now: float) -> tuple[list[Request], list[Request]]:
    """(live, expired): the requests whose deadline has not passed, and the others, answered DeadlineExceeded."""
    live, expired = [], []
    for r in requests:
        if now > r.deadline:
            expired.append(r)
            r.resolve(error=DeadlineExceeded("the request's deadline passed before it was started"))
        else:
            live.append(r)
    return live, expired


def fail_batch(requests: list[Request], error: Exception, stage: str, metrics) -> None:
    """Answer every request of a batch that failed in `stage` with `error`; log it with its traceback and count
    it. Requests already answered (expired) keep their answer."""
    log.error("%s: a batch of %d requests failed", stage, len(requests), exc_info=error)
    metrics.batch_errors[stage].inc()
    for r in requests:
        r.resolve(error=error)


def set_torch_threads(n: int | None) -> None:
    """This OS thread's torch intra-op thread count (each thread has its own). torch gives a thread its count on
    first use, copied from whichever thread set one last, so that happens first: else the other worker's later
    `set_num_threads` would become this thread's count."""
    if n:
        torch.get_num_threads()
        torch.set_num_threads(n)


class BatchWorker:
    """Cuts batches by the batching policy, pads them and builds each one's hash table (on its own CUDA stream on
    a GPU)."""

    def __init__(self, runner: ServingRunner, batcher: Batcher, metrics, on_leave: Callable[[Request], None]):
        self.runner = runner
        self.batcher = batcher
        self.metrics = metrics
        self.on_leave = on_leave  # a request leaves the queue: started, or dropped at its deadline
        device = runner.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def step(
        self, arrived: list[Request], now: float, room: int | None = None, flush: bool = False
    ) -> list[HashedBatch]:
        """Take in `arrived`, then cut and prepare up to `room` batches (None: all that are due); `flush` cuts
        batches without waiting for them to fill (shutdown)."""
        for r in arrived:
            self.batcher.add(r, r.key, len(r.ids), r.arrival)
        out: list[HashedBatch] = []
        while room is None or len(out) < room:
            requests = self.batcher.pop_ready(now, flush=flush)
            if requests is None:
                break
            live, expired = drop_expired(requests, now)
            for r in expired:
                self.on_leave(r)
            if not live:
                continue
            try:
                out.append(self.prepare(live))
            except Exception as e:  # noqa: BLE001 — one failing batch must not stop the worker
                for r in live:
                    self.on_leave(r)
                fail_batch(live, e, "predict", self.metrics)
        return out

    def prepare(self, requests: list[Request]) -> HashedBatch:
        """Pad the requests' ids and build the batch's hash table."""
        t0 = time.perf_counter()
        event = None
        if self._stream is not None:  # never queues behind the kernels of the batch being computed
            with torch.cuda.stream(self._stream):  # the ids are copied on the stream that reads them
                enc = self.runner.pad([r.ids for r in requests])
                table = self.runner.build_hash_table(enc)
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            enc = self.runner.pad([r.ids for r in requests])
            table = self.runner.build_hash_table(enc)
        seconds = time.perf_counter() - t0
        if table is not None:
            self.metrics.hash_build_seconds.observe(seconds)
        return HashedBatch(requests, enc, table, seconds, event)


class InferenceWorker:
    """Runs hashed batches on the model and answers their requests."""

    def __init__(
        self, runner: ServingRunner, metrics, on_leave: Callable[[Request], None], shadow_sample_rate: float = 0.0
    ):
        self.runner = runner
        self.metrics = metrics
        self.on_leave = on_leave
        self.shadow_sample_rate = shadow_sample_rate
        self.batches = 0  # batches run so far (sampling for shadow routing counts them)

    def step(self, batch: HashedBatch, now: float) -> None:
        """Drop the batch's expired requests, run the rest as one batch, answer each. Every request of the batch
        leaves the queue here, whatever happens next; an error fails this batch's requests only."""
        for r in batch.requests:
            self.on_leave(r)
        try:
            live, results = self.start_and_run(batch, now)
        except Exception as e:  # noqa: BLE001 — one failing batch must not stop the worker
            fail_batch(batch.requests, e, "infer", self.metrics)
            return
        resolve_all(live, results)

    def start_and_run(self, batch: HashedBatch, now: float) -> tuple[list[Request], list]:
        """(the requests run, their results): the batch without its expired requests, run on the model."""
        batch = self.start(batch, now)
        if batch is None:
            return [], []
        generating = batch.requests[0].kind == "complete"
        if generating:  # a static batch's sequences run until its longest ends
            self.metrics.running.set(len(batch.requests))
        try:
            results = self.run(batch, shadow=self.shadow_due())
        finally:
            if generating:
                self.metrics.running.set(0)
        observe_generation(self.metrics, batch.requests, results)
        return batch.requests, results

    def start(self, batch: HashedBatch, now: float) -> HashedBatch | None:
        """The batch without its expired requests (None if none is left), its table readable on this thread's
        stream, its requests marked started and counted."""
        if batch.table_event is not None:  # the batch is read below: the batch worker stream's kernels run first
            compute = torch.cuda.current_stream(self.runner.device)
            compute.wait_event(batch.table_event)
            # made on the batch worker's stream, read on this one: their memory is not reused before these reads end
            for t in [*batch.enc.values(), *(batch.table.tensors() if batch.table is not None else [])]:
                t.record_stream(compute)
        live, expired = drop_expired(batch.requests, now)
        if not live:
            return None
        if expired:
            kept = {id(r) for r in live}
            batch = batch.keep([i for i, r in enumerate(batch.requests) if id(r) in kept])
        for r in live:
            r.started = now
            self.metrics.queue_wait_seconds.observe(now - r.arrival)
        self.metrics.observe_batch(len(live), int(batch.enc["attention_mask"].sum()))
        self.batches += 1
        return batch

    def shadow_due(self) -> bool:
        """Whether this batch also runs the router beside the table: every 1/rate-th batch, evenly spread."""
        rate = self.shadow_sample_rate
        return rate > 0 and (self.batches * rate) % 1 < rate

    def run(self, batch: HashedBatch, shadow: bool) -> list:
        """Classification or completion of a batch whose requests share one kind and parameters (each completion
        has its own seed)."""
        first = batch.requests[0]
        if first.kind == "classify":
            return self.runner.classify_ids(batch.enc, first.params["task"], batch.table, shadow)
        p = first.params
        on_text = None
        if any(r.on_text is not None for r in batch.requests):

            def on_text(row: int, delta: str) -> None:
                if batch.requests[row].on_text is not None:
                    batch.requests[row].on_text(delta)

        return self.runner.complete_ids(
            batch.enc,
            p["max_tokens"],
            p["sampling"],
            [r.params["seed"] for r in batch.requests],
            p["stops"],
            on_text,
            batch.table,
            shadow,
            p.get("ignore_eos", False),
        )


def observe_generation(metrics, requests: list[Request], results: list) -> None:
    """Time to first token, time per output token, end-to-end latency and token counts of generated choices (a
    classification's results have none)."""
    for r, c in zip(requests, results):
        if getattr(c, "first_token_at", None) is None:
            continue
        metrics.ttft.observe(c.first_token_at - r.arrival)
        metrics.e2e.observe(c.ended_at - r.arrival)
        if c.completion_tokens > 1:
            metrics.tpot.observe((c.ended_at - c.first_token_at) / (c.completion_tokens - 1))
        metrics.prompt_tokens.inc(c.prompt_tokens)
        metrics.generation_tokens.inc(c.completion_tokens)
