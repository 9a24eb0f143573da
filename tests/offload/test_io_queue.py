"""The disk tier's I/O queue: needed reads go ahead of speculative ones, a promoted prefetch ahead of the other
prefetches, a cancelled read never runs; and the read-rate limit paces reads to its rate over every thread."""

from __future__ import annotations

import threading

import pytest

from sida.offload.io_queue import NEEDED, SPECULATIVE, IOQueue, RateLimit


def held_queue(threads: int = 1):
    """A queue whose reader threads are all held by a gate: what is submitted next waits in the queue."""
    q, gate = IOQueue(threads), threading.Event()
    started = [threading.Event() for _ in range(threads)]
    for ev in started:
        q.submit(lambda ev=ev: (ev.set(), gate.wait(5)))
    for ev in started:
        assert ev.wait(5)
    return q, gate


def test_needed_reads_run_before_speculative_ones_and_speculative_ones_in_their_order():
    q, gate = held_queue()
    ran = []
    futures = [
        q.submit(ran.append, "guess layer 2", priority=SPECULATIVE, order=(2, -0.9)),
        q.submit(ran.append, "guess layer 1, likely", priority=SPECULATIVE, order=(1, -0.9)),
        q.submit(ran.append, "guess layer 1, less likely", priority=SPECULATIVE, order=(1, -0.6)),
        q.submit(ran.append, "needed", priority=NEEDED, order=(1,)),
    ]
    gate.set()
    for f in futures:
        f.result(5)
    assert ran == ["needed", "guess layer 1, likely", "guess layer 1, less likely", "guess layer 2"]
    q.close()


def test_a_promoted_prefetch_runs_ahead_of_the_other_prefetches_once():
    q, gate = held_queue()
    ran = []
    first = q.submit(ran.append, "a", priority=SPECULATIVE, order=(1,))
    late = q.submit(ran.append, "b", priority=SPECULATIVE, order=(2,))
    assert q.promote(late, (2,))
    gate.set()
    first.result(5), late.result(5)
    assert ran == ["b", "a"]  # run once, though it was queued twice
    assert not q.promote(late)  # done: nothing to promote
    q.close()


def test_a_cancelled_read_never_runs_and_close_cancels_what_is_queued():
    q, gate = held_queue()
    ran = []
    cancelled = q.submit(ran.append, "cancelled", priority=SPECULATIVE)
    kept = q.submit(ran.append, "kept")
    assert cancelled.cancel()
    queued = q.submit(ran.append, "never")
    gate.set()
    kept.result(5)
    q.close()
    assert ran == ["kept"] or ran == ["kept", "never"]  # close may come before or after the last one starts
    assert cancelled.cancelled()
    assert queued.cancelled() or queued.done()
    with pytest.raises(RuntimeError, match="closed"):
        q.submit(ran.append, "after close")


def test_a_read_that_raises_gives_its_error_to_the_waiter():
    q = IOQueue(1)
    future = q.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        future.result(5)
    q.close()


class Clock:
    """A clock that moves only when slept on (or told to), to check the pacing without timing anything."""

    def __init__(self):
        self.now = 100.0
        self.slept = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 9))
        self.now += seconds


def test_the_rate_limit_paces_each_read_to_its_slot_on_the_link():
    clock = Clock()
    limit = RateLimit(1e9, clock=clock, sleep=clock.sleep)

    def read(seconds):
        clock.now += seconds  # what the disk itself takes
        return "bytes"

    assert limit.paced(500_000_000, lambda: read(0.1)) == "bytes"  # 0.5 s at 1 GB/s: held 0.4 s after the read
    assert clock.slept == [0.4] and clock.now == pytest.approx(100.5)
    limit.paced(500_000_000, lambda: read(0.7))  # a disk slower than the limit: nothing added
    assert clock.slept == [0.4] and clock.now == pytest.approx(101.2)
    clock.now += 10.0  # idle: no credit is saved up
    limit.paced(1_000_000_000, lambda: read(0.0))
    assert clock.slept == [0.4, 1.0]


def test_reads_that_start_together_share_the_rate():
    clock = Clock()
    limit = RateLimit(1e9, clock=clock, sleep=clock.sleep)
    limit.paced(1_000_000_000, lambda: None)
    clock.now -= 1.0  # a second reader thread asked at the same moment as the first: its slot follows the first's
    limit.paced(1_000_000_000, lambda: None)
    assert clock.now == pytest.approx(102.0)  # two gigabytes at 1 GB/s: done two seconds after the start
    with pytest.raises(ValueError, match="positive"):
        RateLimit(0)
