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

    def expect(self, chances: dict[Hashable, float], start: int = 0) -> None:
        """A new pass through the layers from layer `start` begins, with each key's predicted chance of being used in
        it (a policy that does not look ahead ignores it)."""

    def may_replace(self, victim: Hashable, key: Hashable) -> bool:
        """Whether a prefetch of `key` may evict `victim` (a policy that does not look ahead cannot tell: yes)."""
        return True


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
    """Belady's rule with the predicted future: evicts the expert whose next use is expected latest. A pass runs the
    layers in order, so an expert of a layer at or before the running one is next needed by the next pass, the later
    its layer the later; an expert of a later layer is needed in this pass, at its layer, with its predicted chance
    (`expect`), else in the next pass. Without a prediction every later layer's expert counts as needed in this pass:
    first the experts of layers at or before the running one go, the latest layer first, then those of later layers,
    the farthest first. Ties go to the least recently used. Keys are (layer, expert). An LRU cache over more experts
    than fit cycles through all of them every batch and keeps none; this keeps the early layers' experts from one
    batch to the next.

    `may_replace` keeps prefetches Belady-consistent: a prefetch evicts only an expert expected later than the
    prefetched one, and no sooner than the running layer's own experts are needed again (the next pass): the
    experts a layer is done with are what a load at the next layer would evict, so evicting one needed sooner to
    load early would cost a read that loading on demand would not."""

    name = "layered"

    def __init__(self) -> None:
        super().__init__()
        self._layer = 0  # the layer of the latest access: where the forward pass is
        self._depth = 1  # layers per pass: one more than the deepest layer seen
        self._chance: dict[Hashable, float] = {}  # this pass: predicted chance of use of later layers' keys

    def on_insert(self, key: Hashable) -> None:
        super().on_insert(key)
        self._depth = max(self._depth, key[0] + 1)

    def on_access(self, key: Hashable) -> None:
        super().on_access(key)
        self._layer = key[0]

    def expect(self, chances: dict[Hashable, float], start: int = 0) -> None:
        self._chance = dict(chances)
        self._layer = start - 1  # just before the first layer of the new pass (a decoder step: the first decoder's)

    def next_use(self, key: Hashable) -> float:
        """Layers from the running one until `key` is expected to be used (its chance in this pass weighs its use at
        its layer now against its use in the next pass)."""
        ahead = key[0] - self._layer
        if ahead <= 0:
            return self._depth + ahead
        p = self._chance.get(key, 1.0)
        return p * ahead + (1.0 - p) * (self._depth + ahead)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        candidates = list(candidates)
        if not candidates:
            raise ValueError("no eviction candidate is known to the policy")
        dist = {k: self.next_use(k) for k in candidates}
        worst = max(dist.values())
        return super().victim(k for k in candidates if dist[k] >= worst - 1e-9)

    def may_replace(self, victim: Hashable, key: Hashable) -> bool:
        later = self.next_use(victim)
        return later >= self._depth and later > key[0] - self._layer


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

    def may_replace(self, victim: Hashable, key: Hashable) -> bool:
        """A guess never pushes out the hot set: only a layer that needs more experts than the cold slots hold does."""
        return victim not in self.hot


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
