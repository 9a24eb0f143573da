"""Eviction policies: pure bookkeeping over keys, no tensors, no devices (tested in tests/offload/test_policies.py).

The cache tells a policy what happened (insert, access, remove) and asks it for a victim among the keys
it may evict (resident and unpinned); the policy never sees pinned keys as candidates.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable


class EvictionPolicy:
    """Which resident, unpinned expert to evict: told inserts, accesses and removals, asked for a victim."""

    name = "base"

    def on_insert(self, key: Hashable) -> None:
        """`key` became resident."""
        raise NotImplementedError

    def on_access(self, key: Hashable) -> None:
        """`key` was used while resident."""
        raise NotImplementedError

    def on_remove(self, key: Hashable) -> None:
        """`key` is no longer resident."""
        raise NotImplementedError

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        """The key to evict among `candidates` (non-empty)."""
        raise NotImplementedError


class FIFOPolicy(EvictionPolicy):
    """Evicts the key loaded longest ago, whatever its use since (the paper's policy)."""

    name = "fifo"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def on_insert(self, key: Hashable) -> None:
        self._order[key] = None

    def on_access(self, key: Hashable) -> None:
        pass

    def on_remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        allowed = set(candidates)
        for key in self._order:
            if key in allowed:
                return key
        raise ValueError("no eviction candidate is known to the policy")


class LRUPolicy(FIFOPolicy):
    """Evicts the key used longest ago: FIFO order refreshed on every access."""

    name = "lru"

    def on_access(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)


class LFUPolicy(EvictionPolicy):
    """Evicts the key used least often while resident; ties go to the least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[Hashable, int] = {}
        self._recency = LRUPolicy()

    def on_insert(self, key: Hashable) -> None:
        self._count[key] = 0
        self._recency.on_insert(key)

    def on_access(self, key: Hashable) -> None:
        if key in self._count:
            self._count[key] += 1
            self._recency.on_access(key)

    def on_remove(self, key: Hashable) -> None:
        self._count.pop(key, None)
        self._recency.on_remove(key)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        candidates = [k for k in candidates if k in self._count]
        if not candidates:
            raise ValueError("no eviction candidate is known to the policy")
        fewest = min(self._count[k] for k in candidates)
        return self._recency.victim(k for k in candidates if self._count[k] == fewest)


class LayeredPolicy(LRUPolicy):
    """Evicts the expert a forward pass through the layers needs last (Belady's choice when layers run in order):
    first the experts of layers at or before the one running now, the latest layer first (they are next needed
    by the next batch); then those of later layers, the farthest first. Ties go to the least recently used.
    Keys are (layer, expert). An LRU cache over more experts than fit cycles through all of them every batch and
    keeps none; this keeps the early layers' experts from one batch to the next."""

    name = "layered"

    def __init__(self) -> None:
        super().__init__()
        self._layer = 0  # the layer of the latest access: where the forward pass is

    def on_access(self, key: Hashable) -> None:
        super().on_access(key)
        self._layer = key[0]

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        candidates = list(candidates)
        if not candidates:
            raise ValueError("no eviction candidate is known to the policy")
        rank = {k: (k[0] <= self._layer, k[0]) for k in candidates}
        worst = max(rank.values())
        return super().victim(k for k in candidates if rank[k] == worst)


class StaticHotSetPolicy(LRUPolicy):
    """The static baseline users know (llama.cpp's `--n-cpu-moe`, KTransformers' GPU-expert mask): a fixed hot set,
    the experts most used in traces, stays resident; the other slots serve everything else on demand, least recently
    used first. A hot key is evicted only when every candidate is hot (the hot set is larger than the slots)."""

    name = "static"

    def __init__(self, hot: Iterable[Hashable] = ()) -> None:
        super().__init__()
        self.hot = set(hot)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        candidates = list(candidates)
        cold = [k for k in candidates if k not in self.hot]
        return super().victim(cold or candidates)


def hot_set(counts: dict[Hashable, int], slots: int) -> list[Hashable]:
    """The `slots` most used keys of `counts` (key → uses in traces), most used first; ties by key."""
    return sorted(counts, key=lambda k: (-counts[k], k))[: max(0, slots)]


POLICIES: dict[str, type[EvictionPolicy]] = {
    "fifo": FIFOPolicy,
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "layered": LayeredPolicy,
    "static": StaticHotSetPolicy,  # its hot set is given after the traces are read (`OffloadEngine.keep_hot`)
}


def make_policy(name: str) -> EvictionPolicy:
    """A new policy by name (fifo, lru, lfu, layered, static); a clear error for another name."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; expected one of {', '.join(POLICIES)}") from None
