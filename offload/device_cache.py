"""A fixed pool of device slots holding experts under a budget, with pin counts and a pluggable eviction policy.

The pool is allocated once (no allocator churn); the budget is the number of slots and is never exceeded.
All accounting of expert movement lives here and is read by eval and metrics, never recomputed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from sida.offload.expert_store import ExpertKey, ExpertStore
from sida.offload.policies import EvictionPolicy
from sida.offload.transfer import Transfer


@dataclass
class CacheStats:
    """Running counts of expert movement, kept by the cache where it happens."""

    lookups: int = 0  # experts asked for by a layer about to compute
    hits: int = 0  # ... that were already resident (or in flight from a prefetch)
    on_demand_loads: int = 0  # misses: loaded while the layer waited
    prefetch_loads: int = 0
    evictions: int = 0
    bytes_moved: int = 0
    stall_seconds: float = 0.0  # host time spent waiting for on-demand or late prefetched copies
    waves: int = 0  # extra passes a layer needed because its experts did not fit the budget at once
    peak_resident: int = 0
    hits_by_layer: Counter = field(default_factory=Counter)
    misses_by_layer: Counter = field(default_factory=Counter)

    @property
    def loads(self) -> int:
        return self.on_demand_loads + self.prefetch_loads

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None


class DeviceExpertCache:
    """`num_slots` device buffers of one packed expert each; `acquire` pins experts for compute (loading misses),
    `prefetch` starts loads ahead into free or evictable slots, `release` unpins."""

    def __init__(
        self, store: ExpertStore, num_slots: int, policy: EvictionPolicy, device: torch.device, transfer: Transfer
    ):
        if num_slots < 1:
            raise ValueError("the expert budget must hold at least one expert")
        self.store = store
        self.num_slots = num_slots
        self.policy = policy
        self.device = device
        self.transfer = transfer
        layout = store.layout
        self._slots = [torch.empty(layout.numel, dtype=layout.dtype, device=device) for _ in range(num_slots)]
        self._views = [layout.views(s) for s in self._slots]
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[ExpertKey, int] = {}
        self._pins: Counter = Counter()
        self._pending: dict[int, object] = {}  # slot → copy handle not yet waited for
        self.stats = CacheStats()

    # ------------------------------------------------------------------ queries

    @property
    def resident_keys(self) -> list[ExpertKey]:
        return list(self._slot_of)

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self._slot_of

    @property
    def budget_bytes(self) -> int:
        return self.num_slots * self.store.expert_bytes

    def waves(self, keys: list[ExpertKey]) -> list[list[ExpertKey]]:
        """Split a layer's experts into groups that fit the free-able slots; resident ones go first."""
        room = self.num_slots - sum(1 for k in self._pins if self._pins[k] > 0)
        if room < 1:
            raise RuntimeError("every slot is pinned; release experts before acquiring more")
        ordered = sorted(keys, key=lambda k: not self.is_resident(k))
        groups = [ordered[i : i + room] for i in range(0, len(ordered), room)]
        self.stats.waves += max(0, len(groups) - 1)
        return groups

    # ------------------------------------------------------------------ movement

    def prefetch(self, keys: Iterable[ExpertKey], protect: Iterable[ExpertKey] = ()) -> int:
        """Start loading keys that are not resident, into free slots or over unpinned experts that are neither
        in `keys` nor in `protect` (the current layer's experts). Returns the number of copies started."""
        keys = list(dict.fromkeys(keys))
        wanted = set(keys) | set(protect)
        started = 0
        for key in keys:
            if key in self._slot_of:
                continue
            slot = self._take_slot(protect=wanted)
            if slot is None:
                break
            self._load(key, slot)
            self.stats.prefetch_loads += 1
            started += 1
        return started

    def acquire(self, keys: list[ExpertKey]) -> dict[ExpertKey, dict[str, torch.Tensor]]:
        """Pin `keys` (loading misses now) and return their parameter views, ready for compute."""
        if len(set(keys)) > self.num_slots:
            raise ValueError(f"{len(set(keys))} experts cannot be pinned at once with {self.num_slots} slots")
        out = {}
        for key in keys:
            self.stats.lookups += 1
            if key in self._slot_of:
                self.stats.hits += 1
                self.stats.hits_by_layer[key[0]] += 1
                self.policy.on_access(key)
            else:
                self.stats.misses_by_layer[key[0]] += 1
                slot = self._take_slot(protect=set(keys))
                if slot is None:
                    raise RuntimeError("no evictable slot: too many experts pinned")
                t0 = time.perf_counter()
                self._load(key, slot)
                self.transfer.wait(self._pending.pop(slot, None), block=True)
                self.stats.stall_seconds += time.perf_counter() - t0
                self.stats.on_demand_loads += 1
                self.policy.on_access(key)
            self._pins[key] += 1
            slot = self._slot_of[key]
            handle = self._pending.pop(slot, None)
            if handle is not None:  # prefetched: on CUDA the compute stream waits on the copy's event
                late = not handle.query()  # still in flight: the host waits too, and that is a stall
                self.stats.stall_seconds += self.transfer.wait(handle, block=late)
            out[key] = self._views[slot]
        return out

    def release(self, keys: Iterable[ExpertKey]) -> None:
        """Unpin `keys` (once per acquire); unpinned experts stay resident until evicted."""
        for key in keys:
            if self._pins[key] <= 0:
                raise RuntimeError(f"expert {key} released more often than acquired")
            self._pins[key] -= 1
            if self._pins[key] == 0:
                del self._pins[key]

    def _take_slot(self, protect: set[ExpertKey]) -> int | None:
        if self._free:
            return self._free.pop()
        candidates = [k for k in self._slot_of if k not in self._pins and k not in protect]
        if not candidates:
            return None
        victim = self.policy.victim(candidates)
        slot = self._slot_of.pop(victim)
        self.policy.on_remove(victim)
        self._pending.pop(slot, None)
        self.stats.evictions += 1
        return slot

    def _load(self, key: ExpertKey, slot: int) -> None:
        handle = self.transfer.copy(self._slots[slot], self.store.host(key))  # None: already done (CPU)
        self._slot_of[key] = slot
        self.policy.on_insert(key)
        self.stats.bytes_moved += self.store.expert_bytes
        self.stats.peak_resident = max(self.stats.peak_resident, len(self._slot_of))
        if handle is not None:
            self._pending[slot] = handle
