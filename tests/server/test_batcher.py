"""The batching policy with a fake clock: no threads, no model."""

import pytest

from sida.server.batcher import Batcher


def test_waits_then_releases_the_oldest_group():
    b = Batcher(max_batch_size=4, max_batch_tokens=1000, max_wait_s=0.01)
    b.add("a", "k", 5, now=0.0)
    b.add("b", "k", 5, now=0.004)
    assert b.pop_ready(now=0.005) is None
    assert b.time_to_next(now=0.005) == pytest.approx(0.005)
    assert b.pop_ready(now=0.010) == ["a", "b"]
    assert len(b) == 0 and b.time_to_next(0.02) is None


def test_full_batch_goes_at_once():
    b = Batcher(max_batch_size=2, max_batch_tokens=1000, max_wait_s=10)
    for i, t in enumerate("abc"):
        b.add(t, "k", 5, now=float(i) / 1000)
    assert b.pop_ready(now=0.003) == ["a", "b"]
    assert b.pop_ready(now=0.003) is None  # "c" alone waits for its time
    assert b.pop_ready(now=10.01) == ["c"]


def test_padded_token_limit():
    b = Batcher(max_batch_size=8, max_batch_tokens=100, max_wait_s=10)
    b.add("short", "k", 10, now=0)
    b.add("long", "k", 60, now=0)  # 2 x 60 padded = 120 > 100
    assert b.pop_ready(now=0.0) == ["short"]
    assert b.pop_ready(now=0.0) is None
    assert b.pop_ready(now=10) == ["long"]


def test_incompatible_requests_never_share_a_batch():
    b = Batcher(max_batch_size=8, max_batch_tokens=1000, max_wait_s=0.01)
    b.add("c1", ("classify",), 5, now=0)
    b.add("g1", ("complete", 16), 5, now=0.001)
    b.add("c2", ("classify",), 5, now=0.002)
    assert b.pop_ready(now=0.011) == ["c1", "c2"]
    assert b.pop_ready(now=0.02) == ["g1"]


def test_flush_releases_without_waiting():
    b = Batcher(max_batch_size=8, max_batch_tokens=1000, max_wait_s=100)
    b.add("a", "k", 1, now=0)
    assert b.pop_ready(now=0) is None
    assert b.pop_ready(now=0, flush=True) == ["a"]


def test_oversized_single_request_still_runs():
    b = Batcher(max_batch_size=8, max_batch_tokens=10, max_wait_s=0)
    b.add("huge", "k", 50, now=0)
    assert b.pop_ready(now=0) == ["huge"]


def test_bad_limits():
    with pytest.raises(ValueError):
        Batcher(0, 10, 0)


def test_a_batch_gathers_lengths_close_to_its_oldest_request():
    b = Batcher(max_batch_size=3, max_batch_tokens=10_000, max_wait_s=10)
    for name, tokens in [("old", 40), ("s1", 5), ("l1", 42), ("s2", 6), ("l2", 39), ("s3", 4)]:
        b.add(name, "k", tokens, now=0)
    assert b.pop_ready(now=0) == ["old", "l1", "l2"]  # full: goes at once, padded to 42 instead of 40 + shorts
    assert b.pop_ready(now=0) == ["s1", "s2", "s3"]  # a full batch again


def test_the_oldest_request_is_always_in_the_next_batch_of_its_key():
    b = Batcher(max_batch_size=2, max_batch_tokens=10_000, max_wait_s=0)
    b.add("odd", "k", 100, now=0)
    for i in range(5):
        b.add(f"short{i}", "k", 5, now=0.001 * (i + 1))
    first = b.pop_ready(now=1)
    assert "odd" in first
