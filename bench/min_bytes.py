"""The floor of a benchmark row's expert reads: what Belady's rule with the true future would read at its budget.

Given the experts a cell's layers used, in the order they used them (every acquire of the measured batches), and
the number of slots, Belady's rule (on a miss, evict the resident expert whose next use is farthest) reads the
fewest experts any cache of that size can. It starts from the cache that serves the sequence best (the first
`slots` distinct experts it uses, read for free), so no method, whatever its warm-up left, can read fewer: a row's
bytes read ÷ min_bytes is at least 1, and how far above 1 is what eviction and prefetch still waste.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence


def belady_reads(accesses: Sequence[Hashable], slots: int) -> int:
    """Expert reads Belady's rule makes over `accesses` with `slots` slots, starting from the best cache."""
    if slots < 1:
        raise ValueError("a cache holds at least one expert")
    never = len(accesses)
    next_use = [never] * len(accesses)
    last: dict[Hashable, int] = {}
    for i in range(len(accesses) - 1, -1, -1):
        next_use[i] = last.get(accesses[i], never)
        last[accesses[i]] = i
    resident: dict[Hashable, int] = {}  # key → its next use
    heap: list[tuple[int, int, Hashable]] = []  # (-next use, tie, key): stale entries are skipped
    reads, free = 0, first_fill(accesses, slots)  # accesses before `free` find their expert in the starting cache
    for i, key in enumerate(accesses):
        if key not in resident:
            if len(resident) >= slots:
                while True:
                    far, _, victim = heapq.heappop(heap)
                    if resident.get(victim) == -far:
                        del resident[victim]
                        break
            reads += i >= free
        resident[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], i, key))
    return reads


def first_fill(accesses: Sequence[Hashable], slots: int) -> int:
    """The index of the first access after the first `slots` distinct experts have each been used once (those
    fill the best starting cache)."""
    seen: set[Hashable] = set()
    for i, key in enumerate(accesses):
        if key not in seen:
            if len(seen) == slots:
                return i
            seen.add(key)
    return len(accesses)
