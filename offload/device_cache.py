"""A fixed pool of device slots holding experts under a budget, with pin counts and a pluggable eviction policy.

The pool is allocated up front (no allocator churn; `grow` adds slots once, when an automatic budget has been
measured); the budget is the number of slots and is never exceeded. Every slot's bytes are placed through a
`DeviceMemory` account. Each slot is one `Slot` record whose transitions (free → loading → ready ⇄ pinned, and
back to free) are its methods, the only code that changes a slot.
All accounting of expert movement lives here and is read by eval and metrics, never recomputed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from sida.offload.expert_layout import ExpertKey
from sida.offload.expert_store import ExpertStore
from sida.offload.io_queue import RecentShare
from sida.offload.memory import DeviceMemory, aligned_empty
from sida.offload.policies import EvictionPolicy
from sida.offload.slot import Slot, SlotState
from sida.offload.transfer import Transfer


@dataclass
class CacheStats:
    """Running counts of expert movement, kept by the cache where it happens."""

    lookups: int = 0  # experts asked for by a layer about to compute
    hits: int = 0  # ... that were already resident (or in flight from a prefetch)
    on_demand_loads: int = 0  # misses: loaded while the layer waited
    prefetch_loads: int = 0
    prefetch_cancelled: int = 0  # prefetches given up before their read started (the layer did not need them)
    load_retries: int = 0  # on-demand re-reads of an expert a layer needs after its load failed (once per acquire)
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


def prefetch_bar(busy: float, evicts: bool) -> float:
    """The chance p a guess needs for its prefetch to pay, when the loads' link (the disk, or the bus) is busy a
    share `busy` of the time. Right (p), its early read fills time the link would have idled, a share (1 - busy):
    that is what saves a layer's wait; wrong (1 - p), it takes a read's time from needed reads where the link is
    busy, and where it `evicts`, the victim may have to be read again as well: p (1 - busy) > (1 - p) busy
    (1 + evicts). At one half: p > 1/2 for a free slot, p > 2/3 over a victim."""
    cost = busy * (2.0 if evicts else 1.0)
    return cost / ((1.0 - busy) + cost) if cost > 0 else 0.0


class DeviceExpertCache:
    """`num_slots` device buffers of one packed expert each; `acquire` pins experts for compute (loading misses,
    and reading once more one whose load failed), `prefetch` starts loads ahead into free or evictable slots,
    `release` unpins."""

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
        self.expert_bytes = store.expert_bytes  # every expert is this size: read once, counted on every move
        self.policy = policy
        self.device = device
        self.transfer = transfer
        self.memory = memory or DeviceMemory(device)
        self.num_slots = 0
        self.slots: list[Slot] = []
        # kept by `_load` and `_give_back` only, together with the slot's own transition
        self._by_key: dict[ExpertKey, Slot] = {}  # loading or resident
        self._free: list[Slot] = []  # popped from the end: lowest slot first
        self.stats = CacheStats()
        self.stall_share = RecentShare()  # of time the layers waited for loads
        self.grow(num_slots)

    def grow(self, n: int) -> None:
        """Add `n` empty slots (their bytes placed on the device account first)."""
        if n <= 0:
            return
        layout = self.store.layout
        self.memory.place("experts", n * layout.nbytes)
        added = []
        for index in range(self.num_slots, self.num_slots + n):
            if self.device.type == "cpu":
                raw = aligned_empty(self.store.read_bytes)
                tensor = raw[: layout.nbytes].view(layout.dtype)  # [numel]
            else:
                raw, tensor = None, torch.empty(layout.numel, dtype=layout.dtype, device=self.device)
            added.append(Slot(index, tensor, raw, layout.views(tensor)))
        self.slots += added
        self._free[:0] = reversed(added)
        self.num_slots += n

    # ------------------------------------------------------------------ queries

    @property
    def resident_keys(self) -> list[ExpertKey]:
        return list(self._by_key)

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self._by_key

    def slot_of(self, key: ExpertKey) -> Slot | None:
        """The slot loading or holding `key`, if any."""
        return self._by_key.get(key)

    @property
    def link_busy(self) -> float:
        """The recent share of time the loads' link is busy: the disk readers' (tier disk), else the share of time
        the layers waited for copies (a copy a layer waits for is the link being the bottleneck)."""
        busy = self.transfer.busy_share()
        return self.stall_share.share if busy is None else busy

    @property
    def budget_bytes(self) -> int:
        return self.num_slots * self.expert_bytes

    @property
    def pinned_keys(self) -> list[ExpertKey]:
        """Experts acquired and not yet released."""
        return [k for k, slot in self._by_key.items() if slot.state is SlotState.PINNED]

    def waves(self, keys: list[ExpertKey]) -> list[list[ExpertKey]]:
        """Split a layer's experts into groups that fit the free-able slots; resident ones go first."""
        room = self.num_slots - len(self.pinned_keys)
        if room < 1:
            raise RuntimeError("every slot is pinned; release experts before acquiring more")
        ordered = sorted(keys, key=lambda k: not self.is_resident(k))
        groups = [ordered[i : i + room] for i in range(0, len(ordered), room)]
        self.stats.waves += max(0, len(groups) - 1)
        return groups

    # ------------------------------------------------------------------ movement

    def prefetch(
        self, keys: Iterable[ExpertKey], protect: Iterable[ExpertKey] = (), chance: dict[ExpertKey, float] | None = None
    ) -> int:
        """Start loading keys that are not resident, where it is expected to save more than it costs: a key with
        `chance` p of being needed must clear `prefetch_bar` at the measured `link_busy` (without `chance`, every key
        is certain and goes), and may evict only a victim the policy lets it replace (`may_replace`: never one needed
        before it). Never evicts an expert of `keys` or `protect` (the current layer's). Returns the number of copies
        started."""
        keys = list(dict.fromkeys(keys))
        wanted = set(keys) | set(protect)
        started, busy = 0, self.link_busy
        free_bar, evict_bar = (prefetch_bar(busy, False), prefetch_bar(busy, True)) if chance else (-1.0, -1.0)
        for key in keys:
            p = 1.0 if chance is None else chance.get(key, 0.0)
            if key in self._by_key or p <= free_bar:
                continue
            victim = None
            if not self._free:
                victim = self._victim(wanted)
                if victim is None or p <= evict_bar or not self.policy.may_replace(victim, key):
                    continue
            self._load(key, protect=wanted, prefetch=True, victim=victim, order=(key[0], -p))
            self.stats.prefetch_loads += 1
            started += 1
        return started

    def cancel_prefetches(self, layer: int, needed: Iterable[ExpertKey]) -> int:
        """Give up the prefetches of `layer` it turned out not to need whose read has not started (disk tier): the
        I/O queue moves on to what is needed and their slots are free again. Returns how many were dropped."""
        needed = set(needed)
        dropped = 0
        for key, slot in list(self._by_key.items()):
            if key[0] != layer or key in needed or not slot.prefetched_unused or slot.pending is None:
                continue
            if not self.transfer.cancel(slot.pending):
                continue
            self._give_back(slot)  # the copy never started: the slot keeps its last reader's event
            self.stats.prefetch_loads -= 1  # never read: neither a load nor bytes moved
            self.stats.bytes_moved -= self.expert_bytes
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
        stalled = self.stats.stall_seconds
        try:
            missed = self._start_misses(keys)
            for key in keys:  # prefetches still queued are needed now: ahead of every speculative read
                slot = self._by_key[key]
                if key not in missed and slot.state is SlotState.LOADING:
                    self.transfer.promote(slot.pending, (key[0],))
            for key in keys:
                out[key] = self._acquire_one(key, key in missed)
                pinned.append(key)
        except BaseException:
            self.release(pinned)  # all or nothing: a failed load leaves none of `keys` pinned
            raise
        finally:
            self.stall_share.add_span(self.stats.stall_seconds - stalled)
        return out

    def _start_misses(self, keys: list[ExpertKey]) -> set[ExpertKey]:
        """Start loading every key that is not resident (the layer waits for these: on-demand loads)."""
        missed = [k for k in dict.fromkeys(keys) if k not in self._by_key]
        t0 = time.perf_counter()
        for key in missed:
            if not self._load(key, protect=set(keys)):
                raise RuntimeError("no evictable slot: too many experts pinned")
            self.stats.on_demand_loads += 1
        if missed:  # copies that complete as they start (RAM on CPU) are all stall
            self._stall(missed[0][0], time.perf_counter() - t0)
        return set(missed)

    def _acquire_one(self, key: ExpertKey, missed: bool) -> dict[str, torch.Tensor]:
        """Pin one expert, waiting for its load if it is still in flight. A failed load (prefetched or on demand)
        is read once more, on demand: a miss, not a hit; if that read fails too, its error is raised."""
        layer = key[0]
        slot = self._by_key[key]
        if slot.state is SlotState.LOADING:  # compute waits for the copy; where the host has to wait, a stall
            try:
                self._wait(slot, late=missed or not self.transfer.done(slot.pending))
            except Exception:
                slot, missed = self._retry(key), True
        self.stats.lookups += 1
        if missed:
            self.stats.misses_by_layer[layer] += 1
        else:
            self.stats.hits += 1
            self.stats.hits_by_layer[layer] += 1
        self.policy.on_access(key)
        if slot.take_unused():
            self.stats.prefetch_used_bytes[layer] += self.expert_bytes
        slot.pin()
        return slot.views

    def _wait(self, slot: Slot, late: bool) -> None:
        """Make compute wait for the slot's load (the host too, if `late`); a failed one frees the slot and raises."""
        try:
            self._stall(slot.key[0], self.transfer.wait(slot.pending, block=late))
        except BaseException:
            self._fail(slot)
            raise
        slot.loaded()

    def _retry(self, key: ExpertKey) -> Slot:
        """Read `key` again on demand after its load failed, into the slot that load just freed."""
        self.stats.load_retries += 1
        self.stats.on_demand_loads += 1
        self._load(key, protect={key})  # a slot is free: never False
        slot = self._by_key[key]
        if slot.state is SlotState.LOADING:
            self._wait(slot, late=True)
        return slot

    def _stall(self, layer: int, seconds: float) -> None:
        self.stats.stall_seconds += seconds
        self.stats.stall_by_layer[layer] += seconds

    def release(self, keys: Iterable[ExpertKey]) -> None:
        """Unpin `keys` (once per acquire); unpinned experts stay resident until evicted."""
        for key in keys:
            slot = self._by_key.get(key)
            if slot is None or slot.state is not SlotState.PINNED:
                raise RuntimeError(f"expert {key} released more often than acquired")
            slot.unpin(self.transfer.reads_done())  # a later copy into this slot waits for these kernels only

    # ------------------------------------------------------------------ slot bookkeeping

    def _load(
        self, key: ExpertKey, protect: set[ExpertKey], prefetch: bool = False, victim: ExpertKey | None = None, order=()
    ) -> bool:
        """Start loading `key` into a free slot, evicting `victim` or else the policy's among unpinned experts outside
        `protect` when none is free. False when every slot is held; the handle waits in the slot for the first
        acquire. A prefetch's read waits behind every needed one, in `order`."""
        if not self._free and not self._evict(protect, victim):
            return False
        slot = self._free[-1]
        try:  # ordered after the slot's last readers
            handle = self.transfer.load(
                self.store, key, slot.tensor, slot.raw, slot.last_read, speculative=prefetch, order=order or (key[0],)
            )
        except Exception as err:  # a read that fails as it starts (the ram tier) fails at its wait, as a disk one
            handle = Future()
            handle.set_exception(err)
        self._free.pop()
        slot.start_load(key, handle, prefetch)
        if handle is None:  # the copy completed as it started
            slot.loaded()
        self._by_key[key] = slot
        self.policy.on_insert(key)
        self.stats.bytes_moved += self.expert_bytes
        self.stats.peak_resident = max(self.stats.peak_resident, len(self._by_key))
        return True

    def _victim(self, protect: set[ExpertKey]) -> ExpertKey | None:
        """The policy's victim among unpinned experts outside `protect`, or None if there is none."""
        candidates = [k for k, slot in self._by_key.items() if slot.state is not SlotState.PINNED and k not in protect]
        return self.policy.victim(candidates) if candidates else None

    def _evict(self, protect: set[ExpertKey], victim: ExpertKey | None = None) -> bool:
        """Free the slot of `victim`, or of the policy's among unpinned experts outside `protect`; False if there is
        none."""
        victim = victim if victim is not None else self._victim(protect)
        if victim is None:
            return False
        slot = self._by_key[victim]
        if slot.state is SlotState.LOADING:  # let the copy still writing into it finish; its outcome no longer matters
            try:
                self.transfer.wait(slot.pending, block=True)
            except Exception:  # noqa: BLE001 — the expert it was loading is being evicted anyway
                pass  # the read failed before its copy (the transfer counted it): the slot keeps its last event
            else:
                slot.loaded()
        if slot.take_unused():
            self.stats.prefetch_unused_bytes[victim[0]] += self.expert_bytes
        self._give_back(slot)
        self.stats.evictions += 1
        return True

    def _give_back(self, slot: Slot) -> None:
        """Forget the slot's expert (evicted, or its load cancelled or failed): the slot goes back to the free list."""
        key = slot.key
        slot.give_back()
        del self._by_key[key]
        self.policy.on_remove(key)
        self._free.append(slot)

    def _fail(self, slot: Slot) -> None:
        """Free the slot of a load that failed (its last reader's event kept; the failure is counted by the transfer
        as it happens): a prefetch's bytes count unused."""
        if slot.take_unused():
            self.stats.prefetch_unused_bytes[slot.key[0]] += self.expert_bytes
        self._give_back(slot)
