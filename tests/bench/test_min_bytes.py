"""Belady's reads with the true future: the floor a benchmark row's bytes are divided by."""

from __future__ import annotations

import random
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.min_bytes import belady_reads  # noqa: E402


def lru_reads(accesses, slots: int, start: list) -> int:
    cache = OrderedDict.fromkeys(start[:slots])
    reads = 0
    for key in accesses:
        if key in cache:
            cache.move_to_end(key)
            continue
        reads += 1
        if len(cache) >= slots:
            cache.popitem(last=False)
        cache[key] = None
    return reads


def test_belady_evicts_the_expert_needed_farthest_ahead_and_starts_from_the_best_cache():
    # the cache starts with 1 and 2; 3 evicts 2 (next needed after 1), 2 evicts 3 (never again), 4 evicts ...
    assert belady_reads([1, 2, 3, 1, 2, 4, 1, 2, 3], 2) == 5
    assert belady_reads([1, 2, 1, 2], 2) == 0  # they fit: the best starting cache holds them
    assert belady_reads([], 3) == 0
    with pytest.raises(ValueError):
        belady_reads([1], 0)


@pytest.mark.parametrize("seed", range(5))
def test_no_cache_of_that_size_reads_fewer_whatever_it_starts_with(seed):
    rng = random.Random(seed)
    accesses = [(rng.randrange(4), rng.randrange(8)) for _ in range(400)]
    for slots in (1, 4, 12):
        floor = belady_reads(accesses, slots)
        for _ in range(5):
            start = rng.sample(sorted(set(accesses)), min(slots, len(set(accesses))))
            assert floor <= lru_reads(accesses, slots, start)
