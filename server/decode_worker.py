"""The inference worker under continuous batching: completions join the model's running decode batch
(`offload/decode_batch.py`) between decode steps and are answered on the step they end; classification batches run
whole, between two steps.

    add(batch, now)    a hashed batch from the batch worker: classification runs now; completions wait, in order
    step(now)          the expired and the abandoned leave; waiting completions join while the KV bound has room
                       (their prompts' forward, with their hash table); one decode step; the ended are answered

A completion waits in arrival order for KV room (first come, first served: a later, shorter one does not pass it)
and counts as queued (`sida_num_requests_waiting`, and towards `max_queue`) until it joins. A prefill that fails
fails its requests; a decode step that fails fails every running request and empties the batch; the worker goes
on either way. Like the static worker, nothing here blocks: `Pipeline` calls `step` while anything runs or waits.
"""

from __future__ import annotations

from collections import deque

from sida.offload.decode_batch import DecodeBatch, Sequence
from sida.server.request import DeadlineExceeded, KVCacheTooSmall, Request, resolve_all
from sida.server.workers import HashedBatch, InferenceWorker, drop_expired, fail_batch, observe_generation


class DecodeWorker:
    """Runs completions in the running decode batch; `inner` runs classification and marks batches started."""

    def __init__(self, inner: InferenceWorker, decode: DecodeBatch):
        self.inner = inner
        self.decode = decode
        self.metrics = inner.metrics
        self.waiting: deque[tuple[HashedBatch, list[Sequence]]] = deque()

    @property
    def busy(self) -> bool:
        """Whether sequences run or wait: the pipeline then steps without blocking on its queue."""
        return bool(self.decode.running or self.waiting)

    def add(self, batch: HashedBatch, now: float) -> None:
        """A batch from the batch worker: classification runs at once; completions wait for KV room."""
        if batch.requests[0].kind == "classify":
            self.inner.step(batch, now)
            return
        seqs = []
        for r in batch.requests:
            p = r.params
            seqs.append(
                Sequence(
                    r.ids, p["max_tokens"], p["sampling"], p["seed"], p["stops"], p.get("ignore_eos", False),
                    r.on_text, tag=r,
                )
            )  # fmt: skip
        self.waiting.append((batch, seqs))

    def step(self, now: float) -> None:
        """Let the expired and abandoned go, admit what fits, run one decode step, answer the ended."""
        self._expire(now)
        self._admit(now)
        if not self.decode.running:
            self._gauges()
            return
        try:
            ended = self.decode.step()
        except Exception as e:  # noqa: BLE001 — one failing step must not stop the worker
            fail_batch([s.tag for s in self.decode.clear()], e, "infer", self.metrics)
            ended = []
        self._answer(ended)
        self._gauges()

    # ------------------------------------------------------------------ parts of a step

    def _expire(self, now: float) -> None:
        """Waiting requests past their deadline are answered 504 and leave the queue; running ones past it, or
        whose caller is gone (its future done: cancelled, or answered by a timeout), leave the batch."""
        for i, (batch, seqs) in enumerate(self.waiting):
            live, expired = drop_expired(batch.requests, now)
            for r in expired:
                self.inner.on_leave(r)
            if expired:
                rows = [k for k, r in enumerate(batch.requests) if r in live]
                self.waiting[i] = (batch.keep(rows), [seqs[k] for k in rows])
        self._drop_empty()
        gone = [s for s in self.decode.running if s.tag.future.done() or now > s.tag.deadline]
        if gone:
            for s in gone:
                s.tag.resolve(error=DeadlineExceeded("the request's deadline passed while it was generating"))
            self.decode.abort(gone)

    def _admit(self, now: float) -> None:
        """Waiting batches join, oldest first, as far as the KV bound has room; a batch that fits only in part
        joins in part, its rest staying first in line."""
        while self.waiting:
            batch, seqs = self.waiting[0]
            too_big = [k for k, s in enumerate(seqs) if not self.decode.fits_alone(s)]
            if too_big:
                self._refuse(batch, seqs, too_big)
                continue
            n = self.decode.room_for(seqs)
            if n == 0:
                return
            self.waiting.popleft()
            if n < len(seqs):
                self.waiting.appendleft((batch.keep(list(range(n, len(seqs)))), seqs[n:]))
                batch, seqs = batch.keep(list(range(n))), seqs[:n]
            self._prefill(batch, seqs, now)

    def _prefill(self, batch: HashedBatch, seqs: list[Sequence], now: float) -> None:
        for r in batch.requests:
            self.inner.on_leave(r)
        try:
            started = self.inner.start(batch, now)  # expired ones were dropped before: all are started
            if started is None:
                return
            ended = self.decode.admit(seqs, started.enc, started.table, self.inner.shadow_due())
        except Exception as e:  # noqa: BLE001 — a failing prefill fails only its requests
            self.decode.abort(seqs)
            fail_batch(batch.requests, e, "infer", self.metrics)
            return
        self._answer(ended)

    def _refuse(self, batch: HashedBatch, seqs: list[Sequence], rows: list[int]) -> None:
        """Answer requests that can never fit the KV bound, and take them out of their batch."""
        for k in rows:
            r: Request = batch.requests[k]
            self.inner.on_leave(r)
            need = self.decode.reserved_bytes([seqs[k]])
            r.resolve(
                error=KVCacheTooSmall(
                    f"the prompt ({len(r.ids)} tokens) and max_tokens ({seqs[k].max_new_tokens}) need {need} bytes "
                    f"of KV cache; the server's bound is {self.decode.kv_bound} bytes (kv_cache_bytes)"
                )
            )
        keep = [k for k in range(len(seqs)) if k not in rows]
        self.waiting[0] = (batch.keep(keep), [seqs[k] for k in keep])
        self._drop_empty()

    def _drop_empty(self) -> None:
        self.waiting = deque((b, s) for b, s in self.waiting if s)

    def _answer(self, ended: list[Sequence]) -> None:
        requests = [s.tag for s in ended]
        results = [s.result for s in ended]
        observe_generation(self.metrics, requests, results)
        resolve_all(requests, results)

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.decode.running))
        bound = self.decode.kv_bound
        self.metrics.kv_usage.set(self.decode.kv_reserved / bound if bound else 0.0)
