"""A fixed pool of device slots holding experts under a budget, with pin counts and a pluggable eviction policy.

The pool is allocated up front (no allocator churn; `grow` adds slots once, when an automatic budget has been
measured); the budget is the number of slots and is never exceeded. Every slot's bytes are placed through a
`DeviceMemory` account.
All accounting of expert movement lives here and is read by eval and metrics, never recomputed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from sida.offload.memory import DeviceMemory, aligned_empty
from sida.offload.expert_layout import ExpertKey
from sida.offload.expert_store import ExpertStore
from sida.offload.policies import EvictionPolicy
from sida.offload.transfer import Transfer


@dataclass
class CacheStats:
    """Running counts of expert movement, kept by the cache where it happens."""

    lookups: int = 0  # experts asked for by a layer about to compute
    hits: int = 0  # ... that were already resident (or in flight from a prefetch)
    on_demand_loads: int = 0  # misses: loaded while the layer waited
    prefetch_loads: int = 0
    prefetch_cancelled: int = 0  # prefetches given up before their read started (the layer did not need them)
    evictions: int = 0
    bytes_moved: int = 0
    stall_seconds: float = 0.0  # host time spent waiting for on-demand or late prefetched loads
    waves: int = 0  # extra passes a layer needed because its experts did not fit the budget at once
    peak_resident: int = 0
    hits_by_layer: Counter = field(default_factory=Counter)
    misses_by_layer: Counter = field(default_factory=Counter)
    stall_by_layer: Counter = field(default_factory=Counter)  # layer → seconds its lookups waited
    # bytes of prefetched experts by layer: used by a layer before eviction, or evicted (or failed) unused
    prefetch_used_bytes: Counter = field(default_factory=Counter)
    prefetch_unused_bytes: Counter = field(default_factory=Counter)

    @property
    def prefetch_precision(self) -> float | None:
        """Of the prefetched bytes whose fate is known, the share a layer used."""
        used, unused = sum(self.prefetch_used_bytes.values()), sum(self.prefetch_unused_bytes.values())
        return used / (used + unused) if used + unused else None

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
        self,
        store: ExpertStore,
        num_slots: int,
        policy: EvictionPolicy,
        device: torch.device,
        transfer: Transfer,
        memory: DeviceMemory | None = None,
    ):
        if num_slots < 1:
            raise ValueError("the expert budget must hold at least one expert")
        self.store = store
        self.policy = policy
        self.device = device
        self.transfer = transfer
        self.memory = memory or DeviceMemory(device)
        self.num_slots = 0
        self._slots: list[torch.Tensor] = []
        self._raw: list[torch.Tensor | None] = []  # CPU: each slot's aligned bytes, which disk reads fill directly
        self._views: list[dict[str, torch.Tensor]] = []
        self._unused: set[int] = set()  # slots holding a prefetched expert no layer has used yet
        self._free: list[int] = []  # popped from the end: lowest slot first
        self._slot_of: dict[ExpertKey, int] = {}
        self._pins: Counter = Counter()
        self._pending: dict[int, object] = {}  # slot → copy handle not yet waited for
        self._last_read: dict[int, object] = {}  # slot → event after the last kernels that read it (CUDA)
        self.stats = CacheStats()
        self.grow(num_slots)

    def grow(self, n: int) -> None:
        """Add `n` empty slots (their bytes placed on the device account first)."""
        if n <= 0:
            return
        layout = self.store.layout
        self.memory.place("experts", n * layout.nbytes)
        first = self.num_slots
        for _ in range(n):
            if self.device.type == "cpu":
                raw = aligned_empty(self.store.read_bytes)
                slot = raw[: layout.nbytes].view(layout.dtype)
            else:
                raw, slot = None, torch.empty(layout.numel, dtype=layout.dtype, device=self.device)
            self._raw.append(raw)
            self._slots.append(slot)
            self._views.append(layout.views(slot))
        self._free[:0] = range(first + n - 1, first - 1, -1)
        self.num_slots += n

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
            self._load(key, slot, prefetch=True)
            self.stats.prefetch_loads += 1
            started += 1
        return started

    def cancel_prefetches(self, layer: int, needed: Iterable[ExpertKey]) -> int:
        """Give up the prefetches of `layer` it turned out not to need whose read has not started (disk tier): the
        I/O queue moves on to what is needed and their slots are free again. Returns how many were dropped."""
        needed = set(needed)
        dropped = 0
        for key, slot in list(self._slot_of.items()):
            if key[0] != layer or key in needed or slot not in self._unused:
                continue
            handle = self._pending.get(slot)
            if handle is None or not self.transfer.cancel(handle):
                continue
            del self._pending[slot]
            self._drop(key)
            self.stats.prefetch_loads -= 1  # never read: neither a load nor bytes moved
            self.stats.bytes_moved -= self.store.expert_bytes
            self.stats.prefetch_cancelled += 1
            dropped += 1
        return dropped

    def acquire(self, keys: list[ExpertKey]) -> dict[ExpertKey, dict[str, torch.Tensor]]:
        """Pin `keys` and return their parameter views, ready for compute. Every miss starts loading before the
        first is waited for, so on the disk tier they are read in parallel."""
        if len(set(keys)) > self.num_slots:
            raise ValueError(f"{len(set(keys))} experts cannot be pinned at once with {self.num_slots} slots")
        out: dict[ExpertKey, dict[str, torch.Tensor]] = {}
        pinned: list[ExpertKey] = []
        try:
            missed = self._start_misses(keys)
            for key in keys:
                out[key] = self._acquire_one(key, key in missed)
                pinned.append(key)
        except BaseException:
            self.release(pinned)  # all or nothing: a failed load leaves none of `keys` pinned
            raise
        return out

    def _start_misses(self, keys: list[ExpertKey]) -> set[ExpertKey]:
        """Start loading every key that is not resident (the layer waits for these: on-demand loads)."""
        missed = [k for k in dict.fromkeys(keys) if k not in self._slot_of]
        t0 = time.perf_counter()
        for key in missed:
            slot = self._take_slot(protect=set(keys))
            if slot is None:
                raise RuntimeError("no evictable slot: too many experts pinned")
            self._load(key, slot)
            self.stats.on_demand_loads += 1
        if missed:  # copies that complete as they start (RAM on CPU) are all stall
            self._stall(missed[0][0], time.perf_counter() - t0)
        return set(missed)

    def _acquire_one(self, key: ExpertKey, missed: bool) -> dict[str, torch.Tensor]:
        """Pin one expert, waiting for its load if it is still in flight."""
        layer = key[0]
        self.stats.lookups += 1
        if missed:
            self.stats.misses_by_layer[layer] += 1
        else:
            self.stats.hits += 1
            self.stats.hits_by_layer[layer] += 1
        self.policy.on_access(key)
        slot = self._slot_of[key]
        if slot in self._unused:
            self._unused.discard(slot)
            self.stats.prefetch_used_bytes[layer] += self.store.expert_bytes
        handle = self._pending.pop(slot, None)
        if handle is not None:  # still loading: compute waits for it; where the host has to wait, a stall
            late = missed or not self.transfer.done(handle)
            try:
                self._stall(layer, self.transfer.wait(handle, block=late))
            except BaseException:
                self._drop(key)  # the read failed: the slot is free again and the expert not resident
                raise
        self._pins[key] += 1
        return self._views[slot]

    def _stall(self, layer: int, seconds: float) -> None:
        self.stats.stall_seconds += seconds
        self.stats.stall_by_layer[layer] += seconds

    def release(self, keys: Iterable[ExpertKey]) -> None:
        """Unpin `keys` (once per acquire); unpinned experts stay resident until evicted."""
        for key in keys:
            if self._pins[key] <= 0:
                raise RuntimeError(f"expert {key} released more often than acquired")
            self._pins[key] -= 1
            if self._pins[key] == 0:
                del self._pins[key]
            done = self.transfer.reads_done()  # a later copy into this slot waits for these kernels only
            if done is not None:
                self._last_read[self._slot_of[key]] = done

    @property
    def pinned_keys(self) -> list[ExpertKey]:
        """Experts acquired and not yet released."""
        return list(self._pins)

    def _take_slot(self, protect: set[ExpertKey]) -> int | None:
        if self._free:
            return self._free.pop()
        candidates = [k for k in self._slot_of if k not in self._pins and k not in protect]
        if not candidates:
            return None
        victim = self.policy.victim(candidates)
        slot = self._slot_of.pop(victim)
        self.policy.on_remove(victim)
        self._settle(slot)
        if slot in self._unused:
            self._unused.discard(slot)
            self.stats.prefetch_unused_bytes[victim[0]] += self.store.expert_bytes
        self.stats.evictions += 1
        return slot

    def _settle(self, slot: int) -> None:
        """Let a load still writing into `slot` finish before the slot is reused (its outcome no longer matters)."""
        handle = self._pending.pop(slot, None)
        if handle is not None:
            try:
                self.transfer.wait(handle, block=True)
            except Exception:  # noqa: BLE001 — the expert it was loading is being evicted anyway
                pass

    def _drop(self, key: ExpertKey) -> None:
        """Forget `key` after its load failed: its slot goes back to the free list."""
        slot = self._slot_of.pop(key)
        self.policy.on_remove(key)
        self._unused.discard(slot)
        self._free.append(slot)

    def _load(self, key: ExpertKey, slot: int, prefetch: bool = False) -> None:
        """Start loading `key` into `slot`; its handle waits in `_pending` for the first acquire."""
        try:
            after = self._last_read.get(slot)
            handle = self.transfer.load(self.store, key, self._slots[slot], self._raw[slot], after)
        except BaseException:
            self._free.append(slot)  # the load could not start: the slot stays usable, empty
            raise
        self._last_read.pop(slot, None)
        self._slot_of[key] = slot
        self.policy.on_insert(key)
        self.stats.bytes_moved += self.store.expert_bytes
        self.stats.peak_resident = max(self.stats.peak_resident, len(self._slot_of))
        if prefetch:
            self._unused.add(slot)
        if handle is not None:
            self._pending[slot] = handle
