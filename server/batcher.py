"""The batching policy: pure, driven by the caller's clock (tests use a fake one; no threads here).

Requests are grouped by a compatibility key (task, sampling parameters). A group is released when it is
full (size or padded tokens) or when its oldest request has waited `max_wait_s`; oldest group first. A
batch is the group's oldest request and the requests closest to it in length.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Waiting:
    """A request not yet batched: its compatibility key, token count and arrival time."""

    item: Any
    key: Hashable
    tokens: int
    arrival: float


class Batcher:
    def __init__(self, max_batch_size: int, max_batch_tokens: int, max_wait_s: float):
        if max_batch_size < 1 or max_batch_tokens < 1 or max_wait_s < 0:
            raise ValueError("batch size and tokens must be >= 1 and the wait >= 0")
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self._waiting: list[_Waiting] = []  # arrival order

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, item: Any, key: Hashable, tokens: int, now: float) -> None:
        self._waiting.append(_Waiting(item, key, tokens, now))

    def _take(self, key: Hashable) -> list[_Waiting]:
        """The key's oldest request and, of the others, those closest to it in length, while the size and
        padded-token limits hold (at least the oldest). Similar lengths waste less on padding; including the
        oldest every time means no request waits for more than the batches ahead of it."""
        members = [p for p in self._waiting if p.key == key]
        oldest = members[0]
        others = sorted(members[1:], key=lambda p: abs(p.tokens - oldest.tokens))  # stable: ties by arrival
        chosen, width = [oldest], oldest.tokens
        for p in others:
            if len(chosen) == self.max_batch_size:
                break
            w = max(width, p.tokens)
            if w * (len(chosen) + 1) > self.max_batch_tokens:
                continue
            chosen.append(p)
            width = w
        order = {id(p): i for i, p in enumerate(members)}
        return sorted(chosen, key=lambda p: order[id(p)])  # arrival order

    def pop_ready(self, now: float, flush: bool = False) -> list[Any] | None:
        """A batch to run now, or None. `flush` releases the oldest group without waiting (shutdown)."""
        seen = set()
        for p in self._waiting:
            if p.key in seen:
                continue
            seen.add(p.key)
            group = self._take(p.key)
            members = sum(1 for q in self._waiting if q.key == p.key)
            full = len(group) < members or len(group) == self.max_batch_size
            if flush or full or now - p.arrival >= self.max_wait_s:
                taken = {id(q) for q in group}
                self._waiting = [q for q in self._waiting if id(q) not in taken]
                return [q.item for q in group]
        return None

    def time_to_next(self, now: float) -> float | None:
        """Seconds until the oldest request's wait runs out (None when nothing waits)."""
        if not self._waiting:
            return None
        return max(0.0, self._waiting[0].arrival + self.max_wait_s - now)
