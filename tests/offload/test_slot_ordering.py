"""The order of copies into the slots and reads of them, checked on CPU. A recording fake of the stream calls
(`StreamOps`) logs every queued copy, read, event record and wait as a node of a happens-before graph, so the
cache runs its CUDA paths (side stream, events, staged disk reads) on CPU tensors. The copies really run, so the
data is checked too. Every copy into a slot must happen after every earlier read of it, and every read after the
copy that filled the slot."""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from sida.offload.device import CudaStreams, StreamOps
from sida.offload.device_cache import DeviceExpertCache
from sida.offload.expert_layout import ModuleExperts
from sida.offload.expert_store import ExpertStore
from sida.offload.policies import make_policy
from sida.offload.transfer import Transfer
from tests.offload.test_contracts import gaps

CPU = torch.device("cpu")


@dataclass(eq=False)
class Node:
    """One queued operation (copy, read, record, wait) or host wait (host), with all that happens before it."""

    id: int
    kind: str
    stream: str | None  # None: a host wait, on the thread that made it
    target: int | None  # the data address a copy writes or a read reads
    ancestors: int = field(repr=False)  # bit i set: node i happens before this one

    def after(self, other: Node) -> bool:
        return bool(self.ancestors >> other.id & 1)


class RecordingStreams:
    """`StreamOps` on CPU that records a happens-before graph. Edges: program order on a stream, event record →
    wait, and a host wait → what the same thread queues next. `done` always answers yes without adding an edge,
    so nothing the cache learns from a poll counts as ordering (a conservative fake)."""

    def __init__(self, pinned: bool = True):
        self.pinned = pinned
        self.nodes: list[Node] = []
        self.compute = "compute"
        self._tail: dict[str, Node] = {}
        self._host: dict[int, Node] = {}  # thread → its latest host wait
        self._lock = threading.Lock()
        self._streams = 0

    def _add(self, kind: str, stream: str | None, target: int | None = None, extra: tuple[Node, ...] = ()) -> Node:
        with self._lock:
            preds = [*extra, self._tail.get(stream), self._host.get(threading.get_ident())]
            ancestors = 0
            for p in preds:
                if p is not None:
                    ancestors |= p.ancestors | 1 << p.id
            node = Node(len(self.nodes), kind, stream, target, ancestors)
            self.nodes.append(node)
            if stream is None:
                self._host[threading.get_ident()] = node
            else:
                self._tail[stream] = node
            return node

    def side_stream(self) -> str:
        self._streams += 1
        return f"side{self._streams}"

    def compute_stream(self) -> str:
        return self.compute

    def record(self, stream: str) -> Node:
        return self._add("record", stream)

    def wait(self, stream: str, event: Node) -> None:
        self._add("wait", stream, extra=(event,))

    def host_wait(self, event: Node) -> None:
        self._add("host", None, extra=(event,))

    def host_wait_stream(self, stream: str) -> None:
        tail = self._tail.get(stream)
        self._add("host", None, extra=() if tail is None else (tail,))

    def done(self, event: Node) -> bool:
        return True

    def copy(self, stream: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)
        self._add("copy", stream, dst.data_ptr())

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return self.pinned

    def read(self, tensor: torch.Tensor) -> None:
        """A compute kernel reading `tensor` (the test plays the layer)."""
        self._add("read", self.compute, tensor.data_ptr())


def misordered(streams: RecordingStreams, cache: DeviceExpertCache) -> list[str]:
    """Every copy into a slot not ordered after an earlier read or copy of it, and every read not ordered after
    the copy that filled its slot."""
    slot_at = {slot.tensor.data_ptr(): slot.index for slot in cache.slots}
    found: list[str] = []
    for ptr, index in slot_at.items():
        reads: list[Node] = []
        copies: list[Node] = []
        for node in (n for n in streams.nodes if n.target == ptr):
            if node.kind == "copy":
                found += [
                    f"copy #{node.id} into slot {index} is not ordered after read #{r.id} of it"
                    for r in reads
                    if not node.after(r)
                ]
                found += [
                    f"copy #{node.id} into slot {index} is not ordered after copy #{c.id} into it"
                    for c in copies
                    if not node.after(c)
                ]
                copies.append(node)
            else:
                if not copies or not node.after(copies[-1]):
                    found.append(f"read #{node.id} of slot {index} is not ordered after the copy that filled it")
                reads.append(node)
    return found


def experts(layers: int = 3, per_layer: int = 6) -> dict:
    torch.manual_seed(0)
    return {(la, e): nn.Linear(8, 8, bias=False) for la in range(layers) for e in range(per_layer)}


def recorded_cache(tmp_path, tier: str, num_slots: int, pinned: bool = True):
    """A cache on CPU whose transfers go through a RecordingStreams: its CUDA paths, recorded."""
    modules = experts()
    path = tmp_path / "e.safetensors" if tier == "disk" else None
    store = ExpertStore.build(ModuleExperts(modules.items()), tier, False, path, "fp")
    streams = RecordingStreams(pinned)
    transfer = Transfer(CPU, store.layout.numel, store.layout.dtype, streams=streams)
    return DeviceExpertCache(store, num_slots, make_policy("lru"), CPU, transfer), streams, modules


def read_and_release(cache, streams, modules, keys) -> None:
    """The layer's part: acquire `keys`, read each slot on the compute stream (checking its weights), release."""
    views = cache.acquire(keys)
    for key in keys:
        streams.read(cache.slot_of(key).tensor)
        torch.testing.assert_close(views[key]["weight"], modules[key].weight)
    cache.release(keys)


def run_layer(cache, streams, modules, needed, upcoming) -> None:
    """What the MoE layer asks of the cache for one layer: cancel the guesses it does not need, then per wave
    acquire, prefetch the next layer's guesses, and read and release each expert, prefetching into its slot."""
    cache.cancel_prefetches(needed[0][0], needed)
    waves = cache.waves(needed)
    for i, wave in enumerate(waves):
        views = cache.acquire(wave)
        later = [k for w in waves[i + 1 :] for k in w]
        if i == 0:
            cache.prefetch(upcoming, protect=set(needed))
        for j, key in enumerate(wave):
            streams.read(cache.slot_of(key).tensor)
            torch.testing.assert_close(views[key]["weight"], modules[key].weight)
            cache.release([key])
            cache.prefetch(later + upcoming, protect=set(wave[j + 1 :]))


@pytest.mark.parametrize(("tier", "pinned"), [("ram", True), ("ram", False), ("disk", True)])
@pytest.mark.parametrize("num_slots", [1, 3, 7])
def test_batches_through_the_layers_keep_every_copy_and_read_in_order(tmp_path, tier, pinned, num_slots):
    cache, streams, modules = recorded_cache(tmp_path, tier, num_slots, pinned)
    rng = random.Random(num_slots)
    for _ in range(12):
        for layer in range(3):
            needed = [(layer, e) for e in rng.sample(range(6), rng.randint(1, 4))]
            upcoming = [((layer + 1) % 3, e) for e in rng.sample(range(6), rng.randint(0, 3))]
            run_layer(cache, streams, modules, needed, upcoming)
    s = cache.stats
    assert s.evictions > 0 and s.prefetch_loads > 0 and (num_slots == 7 or s.waves > 0)
    assert misordered(streams, cache) == []


def test_a_cancelled_prefetch_leaves_its_slot_ordered_after_the_last_reads(tmp_path):
    cache, streams, modules = recorded_cache(tmp_path, "disk", 3)
    for e in range(3):  # one at a time: each slot's last reads differ
        read_and_release(cache, streams, modules, [(0, e)])
    gate = threading.Event()
    real = cache.store.read_into
    cache.store.read_into = lambda key, buf: (gate.wait(5), real(key, buf))  # hold the I/O threads
    assert cache.prefetch([(1, 0), (1, 1), (1, 2)]) == 3  # evicts all three; two reads start, one waits
    assert cache.cancel_prefetches(1, [(1, 0), (1, 1)]) == 1
    gate.set()
    read_and_release(cache, streams, modules, [(2, 0)])  # into the cancelled prefetch's slot
    assert misordered(streams, cache) == []


def failing_reads(cache, bad) -> None:
    real = cache.store.read_into

    def read_into(key, buf):
        if key == bad:
            raise OSError("I/O error")
        real(key, buf)

    cache.store.read_into = read_into


def test_a_failed_prefetch_read_leaves_its_slot_ordered_after_the_last_reads(tmp_path):
    cache, streams, modules = recorded_cache(tmp_path, "disk", 1)
    read_and_release(cache, streams, modules, [(0, 0)])
    failing_reads(cache, (0, 1))
    assert cache.prefetch([(0, 1)]) == 1
    with pytest.raises(OSError, match="I/O error"):
        cache.acquire([(0, 1)])
    read_and_release(cache, streams, modules, [(0, 2)])
    assert misordered(streams, cache) == []


def test_evicting_a_prefetch_whose_read_failed_leaves_the_slot_ordered_after_the_last_reads(tmp_path):
    cache, streams, modules = recorded_cache(tmp_path, "disk", 1)
    read_and_release(cache, streams, modules, [(0, 0)])
    failing_reads(cache, (0, 1))
    cache.prefetch([(0, 1)])
    read_and_release(cache, streams, modules, [(0, 2)])  # evicts the failed prefetch, loads into its slot
    assert cache.stats.evictions == 2
    assert misordered(streams, cache) == []


def test_the_checker_sees_a_copy_that_overtakes_a_read(tmp_path):
    cache, streams, modules = recorded_cache(tmp_path, "ram", 1)
    read_and_release(cache, streams, modules, [(0, 0)])
    cache.slots[0].last_read = None  # what a lost last-reader event looks like
    read_and_release(cache, streams, modules, [(0, 1)])
    [found] = misordered(streams, cache)
    assert re.fullmatch(r"copy #\d+ into slot 0 is not ordered after read #\d+ of it", found)


def test_the_fake_and_cuda_streams_both_have_every_stream_call():
    assert gaps(RecordingStreams, StreamOps) == [] and gaps(CudaStreams, StreamOps) == []
