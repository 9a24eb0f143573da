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
class _Pending:
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
        self._pending: list[_Pending] = []  # arrival order

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, item: Any, key: Hashable, tokens: int, now: float) -> None:
        self._pending.append(_Pending(item, key, tokens, now))

    def _take(self, key: Hashable) -> list[_Pending]:
        """The key's oldest request and, of the others, those closest to it in length, while the size and
        padded-token limits hold (at least the oldest). Similar lengths waste less on padding; including the
        oldest every time means no request waits for more than the batches ahead of it."""
        members = [p for p in self._pending if p.key == key]
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
        for p in self._pending:
            if p.key in seen:
                continue
            seen.add(p.key)
            group = self._take(p.key)
            members = sum(1 for q in self._pending if q.key == p.key)
            full = len(group) < members or len(group) == self.max_batch_size
            if flush or full or now - p.arrival >= self.max_wait_s:
                taken = {id(q) for q in group}
                self._pending = [q for q in self._pending if id(q) not in taken]
                return [q.item for q in group]
        return None

    def time_to_next(self, now: float) -> float | None:
        """Seconds until the oldest request's wait runs out (None when nothing is pending)."""
        if not self._pending:
            return None
        return max(0.0, self._pending[0].arrival + self.max_wait_s - now)
