"""The disk tier's I/O queue: reader threads that take needed reads before speculative ones, and a read-rate limit.

A layer waiting for an expert must never wait behind a prefetch that may not be needed, so every read is submitted
with a priority: `NEEDED` (a layer waits for it) or `SPECULATIVE` (a prefetch), then, within a class, an order key
(the layer that needs it, then how likely it is to be needed). A prefetch that turns out to be needed before its
read started is `promote`d and goes ahead of every speculative read. A read not yet started can be cancelled
(`Future.cancel`); one under way always finishes.

`RateLimit` paces the reads of all reader threads together to a set rate, as one link of that speed would, so a
benchmark can run on a disk of known speed whatever the machine's disk does that day. `RecentShare` measures the
share of recent time something took: here, the time at least one read was under way.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

NEEDED, SPECULATIVE = 0, 1


class RateLimit:
    """A link of `bytes_per_s` shared by every reader thread: each read has its slot on the link, after the slots
    already given (`end = max(now, last end) + bytes / rate`), and completes no earlier than its slot's end, so a
    read alone takes bytes / rate and reads together share the rate. A disk slower than the limit is left as it
    is (the read completes when it completes)."""

    def __init__(self, bytes_per_s: float, clock: Callable[[], float] = time.monotonic, sleep=time.sleep):
        if bytes_per_s <= 0:
            raise ValueError("a read limit must be a positive number of bytes per second")
        self.bytes_per_s = float(bytes_per_s)
        self._clock, self._sleep = clock, sleep
        self._end = 0.0  # when the slots given so far end
        self._lock = threading.Lock()

    def paced(self, nbytes: int, read: Callable[[], object]):
        """`read()` of `nbytes`, completed no earlier than its slot on the link ends; returns what it returns."""
        with self._lock:
            self._end = max(self._clock(), self._end) + nbytes / self.bytes_per_s
            end = self._end
        result = read()
        wait = end - self._clock()
        if wait > 0:
            self._sleep(wait)
        return result


class RecentShare:
    """The share of recent time something took (waits, a busy link), decaying over about `horizon_s` seconds; one
    half before anything is measured."""

    def __init__(self, horizon_s: float = 2.0, clock: Callable[[], float] = time.perf_counter):
        self.horizon_s = horizon_s
        self._clock = clock
        self._part, self._whole = 0.05, 0.1  # the prior: one half, worth a tenth of a second
        self._last: float | None = None
        self._lock = threading.Lock()

    def add(self, part_s: float, whole_s: float) -> None:
        """Of the last `whole_s` seconds, `part_s` were taken."""
        with self._lock:
            keep = math.exp(-whole_s / self.horizon_s)
            self._part = self._part * keep + part_s
            self._whole = self._whole * keep + max(whole_s, part_s)

    def add_span(self, part_s: float) -> None:
        """`part_s` seconds were taken, out of the time since the last `add_span` (none, the first time)."""
        now = self._clock()
        whole = 0.0 if self._last is None else now - self._last
        self._last = now
        self.add(part_s, whole)

    @property
    def share(self) -> float:
        with self._lock:
            return min(1.0, self._part / self._whole) if self._whole > 0 else 0.5


class _Job:
    __slots__ = ("future", "fn", "args", "taken")

    def __init__(self, future: Future, fn, args):
        self.future, self.fn, self.args, self.taken = future, fn, args, False


class IOQueue:
    """`threads` reader threads over one priority queue; `submit` returns a `Future`."""

    def __init__(self, threads: int, name: str = "sida-io"):
        self._heap: list[tuple] = []
        self._jobs: dict[Future, _Job] = {}
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._running = 0  # reads under way
        self._busy_since = self._idle_since = time.perf_counter()
        self.busy = RecentShare()  # of time at least one read is under way
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args, priority: int = NEEDED, order: tuple = ()) -> Future:
        """Run `fn(*args)` on a reader thread: every `NEEDED` read before any `SPECULATIVE` one, then by `order`
        (smallest first), then first come first served."""
        future: Future = Future()
        job = _Job(future, fn, args)
        with self._cv:
            if self._closed:
                raise RuntimeError("the I/O queue is closed")
            self._jobs[future] = job
            heapq.heappush(self._heap, (priority, order, next(self._seq), job))
            self._cv.notify()
        return future

    def promote(self, future: Future, order: tuple = ()) -> bool:
        """A queued read is needed now: it goes ahead of every speculative read. False if it has started or ended."""
        with self._cv:
            job = self._jobs.get(future)
            if job is None or job.taken:
                return False
            heapq.heappush(self._heap, (NEEDED, order, next(self._seq), job))  # the old entry is skipped when met
            self._cv.notify()
            return True

    def _next(self) -> _Job | None:
        with self._cv:
            while True:
                while self._heap:
                    job = heapq.heappop(self._heap)[-1]
                    if job.taken:  # a promoted read's old entry, or one already run
                        continue
                    job.taken = True
                    del self._jobs[job.future]
                    return job
                if self._closed:
                    return None
                self._cv.wait()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled before it started
            self._started()
            try:
                result = job.fn(*job.args)
            except BaseException as err:  # noqa: BLE001 — the waiter gets it from the future
                job.future.set_exception(err)
            else:
                job.future.set_result(result)
            finally:
                self._ended()

    def _started(self) -> None:
        with self._cv:
            if self._running == 0:
                self._busy_since = time.perf_counter()
            self._running += 1

    def _ended(self) -> None:
        """A busy period (some read under way) that ends now is counted against the idle time before it."""
        with self._cv:
            self._running -= 1
            if self._running == 0:
                now = time.perf_counter()
                self.busy.add(now - self._busy_since, now - self._idle_since)
                self._idle_since = now

    def close(self) -> None:
        """Cancel the queued reads, let the ones under way finish and stop the threads; idempotent."""
        with self._cv:
            self._closed = True
            jobs, self._jobs, self._heap = list(self._jobs.values()), {}, []
            self._cv.notify_all()
        for job in jobs:
            job.future.cancel()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
