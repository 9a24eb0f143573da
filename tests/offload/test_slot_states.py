"""A cache slot's state machine: each legal transition, on the `Slot` record and through the cache's paths (load,
acquire, release, eviction, a cancelled prefetch, a failed read), and an illegal one refused."""

import threading

import pytest
import torch
from torch import nn

from sida.offload.device_cache import DeviceExpertCache
from sida.offload.expert_layout import ModuleExperts
from sida.offload.expert_store import ExpertStore
from sida.offload.policies import make_policy
from sida.offload.slot import Slot, SlotState, SlotStateError
from sida.offload.transfer import Transfer

CPU = torch.device("cpu")
FREE, LOADING, READY, PINNED = SlotState.FREE, SlotState.LOADING, SlotState.READY, SlotState.PINNED


def slot() -> Slot:
    tensor = torch.zeros(4)
    return Slot(0, tensor, None, {"w": tensor})


def test_free_loading_ready_pinned_ready_free_keeps_the_last_reader():
    s, handle, reads = slot(), object(), [object(), object()]
    s.start_load((0, 1), handle, prefetch=True)
    assert (s.state, s.key, s.pending, s.prefetched_unused) == (LOADING, (0, 1), handle, True)
    s.loaded()
    assert (s.state, s.pending, s.last_read) == (READY, None, None)
    s.pin()
    s.pin()
    assert (s.state, s.pins) == (PINNED, 2)
    s.unpin(reads[0])
    assert (s.state, s.pins, s.last_read) == (PINNED, 1, reads[0])
    s.unpin(reads[1])
    assert (s.state, s.pins, s.last_read) == (READY, 0, reads[1])
    assert s.take_unused() and not s.take_unused()  # a prefetch counts as used once
    s.give_back()  # evicted
    assert (s.state, s.key, s.last_read) == (FREE, None, reads[1])  # the next copy must still wait for the reads


def test_a_load_cancelled_or_failed_keeps_the_event_its_copy_was_to_wait_for():
    s, read = slot(), object()
    s.start_load((0, 1), object(), prefetch=True)
    s.loaded()
    s.pin()
    s.unpin(read)
    s.give_back()
    s.start_load((0, 2), object(), prefetch=True)  # its copy was to be ordered after `read`
    s.give_back()  # ... but never ran
    assert (s.state, s.key, s.pending, s.prefetched_unused, s.last_read) == (FREE, None, None, False, read)
    s.start_load((0, 3), object(), prefetch=False)
    s.loaded()  # this copy was ordered after `read` and has been waited for
    assert s.last_read is None


def test_unpin_on_cpu_keeps_no_event():
    s = slot()
    s.start_load((0, 1), None, prefetch=False)
    s.loaded()
    s.pin()
    s.unpin(None)
    assert (s.state, s.last_read) == (READY, None)


@pytest.mark.parametrize(
    ("setup", "illegal"),
    [
        ([], "pin"),  # a free slot holds nothing to compute with
        ([], "give_back"),  # nor anything to evict
        ([], "loaded"),
        ([], "unpin"),
        (["start_load"], "pin"),  # compute must wait for the copy first
        (["start_load"], "start_load"),
        (["start_load", "loaded"], "start_load"),  # a resident expert is evicted before its slot is reused
        (["start_load", "loaded"], "unpin"),
        (["start_load", "loaded", "pin"], "give_back"),  # a pinned expert is never evicted
        (["start_load", "loaded", "pin"], "loaded"),
    ],
)
def test_an_illegal_transition_raises(setup, illegal):
    s = slot()
    steps = {
        "start_load": lambda: s.start_load((0, 1), object(), prefetch=False),
        "loaded": s.loaded,
        "pin": s.pin,
        "unpin": lambda: s.unpin(None),
        "give_back": s.give_back,
    }
    for step in setup:
        steps[step]()
    before = (s.state, s.key, s.pins)
    with pytest.raises(SlotStateError, match=r"slot 0 .* cannot"):
        steps[illegal]()
    assert (s.state, s.key, s.pins) == before  # refused, not half done


def cache_of(tmp_path, tier="ram", num_slots=2):
    torch.manual_seed(0)
    modules = {(0, e): nn.Linear(4, 4, bias=False) for e in range(6)}
    store = ExpertStore.build(ModuleExperts(modules.items()), tier, False, tmp_path / "e.safetensors", "fp")
    transfer = Transfer(CPU, store.layout.numel, store.layout.dtype)
    return DeviceExpertCache(store, num_slots, make_policy("lru"), CPU, transfer)


def states(cache) -> list[tuple]:
    return [(s.state, s.key, s.pins) for s in cache.slots]


def test_the_cache_moves_slots_only_through_their_transitions(tmp_path):
    cache = cache_of(tmp_path)
    assert states(cache) == [(FREE, None, 0)] * 2
    cache.acquire([(0, 0)])
    cache.acquire([(0, 0)])
    assert states(cache) == [(PINNED, (0, 0), 2), (FREE, None, 0)]  # a copy from RAM completes as it starts
    cache.release([(0, 0)])
    cache.release([(0, 0)])
    cache.prefetch([(0, 1)])
    assert states(cache) == [(READY, (0, 0), 0), (READY, (0, 1), 0)]
    assert cache.slot_of((0, 1)).prefetched_unused
    cache.acquire([(0, 2)])  # evicts (0, 0), the least recently used
    assert states(cache) == [(PINNED, (0, 2), 1), (READY, (0, 1), 0)]
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release([(0, 1)])


def test_disk_loads_cancelled_and_failed_give_their_slots_back(tmp_path):
    cache = cache_of(tmp_path, "disk", num_slots=4)
    gate = threading.Event()
    real = cache.store.read_into

    def read_into(key, buf):
        gate.wait(5)
        if key == (0, 1):
            raise OSError("I/O error")
        real(key, buf)

    cache.store.read_into = read_into
    cache.prefetch([(0, 0), (0, 1), (0, 2), (0, 3)])  # two reads start, two wait in the queue
    assert [s.state for s in cache.slots] == [LOADING] * 4
    assert cache.cancel_prefetches(0, [(0, 0), (0, 1)]) == 2
    assert states(cache) == [(LOADING, (0, 0), 0), (LOADING, (0, 1), 0), (FREE, None, 0), (FREE, None, 0)]
    gate.set()
    with pytest.raises(OSError, match="I/O error"):
        cache.acquire([(0, 0), (0, 1)])  # all or nothing: (0, 0) is not left pinned
    assert states(cache) == [(READY, (0, 0), 0), (FREE, None, 0), (FREE, None, 0), (FREE, None, 0)]
    assert cache.pinned_keys == [] and cache.resident_keys == [(0, 0)]
