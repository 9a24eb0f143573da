"""CUDA only (marked `gpu`, skipped without a device): accounted device bytes against torch's allocator, and the
ordering of expert copies against the compute that reads the slots."""

import threading

import pytest
import torch

from sida.offload.engine import OffloadConfig, OffloadEngine
from sida.offload.model_loader import load_model
from sida.offload.runner import Runner
from sida.offload.transfer import IO_THREADS

pytestmark = pytest.mark.gpu
CYCLES = 200_000_000  # torch.cuda._sleep: long enough that queued compute is still running when checked


def test_loading_under_the_budget_places_only_dense_weights_and_slots(tiny8_dir):
    cuda = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded = load_model(tiny8_dir, device="cuda", experts="host")
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=3), cuda)
    torch.cuda.synchronize()
    placed = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    accounted = engine.memory.total
    assert engine.memory.by_kind["experts"] == 3 * engine.expert_bytes
    # torch rounds each allocation up to 512 bytes: allow that per tensor, nothing more
    slack = 512 * (len(list(loaded.model.parameters())) + engine.num_slots)
    assert accounted <= placed <= accounted + slack
    assert peak <= accounted + slack  # no expert ever reached the device outside the slots
    texts = ["a witty movie .", "a dull mess ."]
    expected = [c.label for c in Runner(load_model(tiny8_dir)).classify(texts)]
    assert [c.label for c in Runner(loaded, "cuda", engine=engine).classify(texts)] == expected


def cache_of(tiny8_dir, slots, **cfg):
    loaded = load_model(tiny8_dir, device="cuda", experts="host")
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=slots, **cfg), torch.device("cuda"))
    return engine.cache


def test_a_copy_into_a_free_slot_does_not_wait_for_queued_compute(tiny8_dir):
    cache = cache_of(tiny8_dir, 4)
    torch.cuda.synchronize()
    torch.cuda._sleep(CYCLES)  # compute queued on the current stream, touching no slot
    cache.prefetch([(0, 1)])
    handle = cache.slot_of((0, 1)).pending
    handle.synchronize()  # the copy is done ...
    assert not torch.cuda.current_stream().query()  # ... while the compute queued before it still runs
    torch.cuda.synchronize()


def read_late(cache, key) -> tuple[dict, dict]:
    """Acquire `key`, queue a read of its slot behind a long sleep kernel, release it: (its weights, the read)."""
    first = cache.acquire([key])[key]
    expected = {k: v.clone() for k, v in first.items()}
    torch.cuda.synchronize()
    torch.cuda._sleep(CYCLES)  # the read below runs late
    read = {k: v * 1 for k, v in first.items()}  # compute reading the slot
    cache.release([key])
    return expected, read


def test_a_copy_into_a_slot_waits_for_the_kernels_that_read_it(tiny8_dir):
    cache = cache_of(tiny8_dir, 1)
    expected, read = read_late(cache, (0, 0))
    cache.prefetch([(0, 1)])  # evicts (0, 0): the copy must wait for `read`
    torch.cuda.synchronize()
    for k in expected:
        torch.testing.assert_close(read[k], expected[k])


@pytest.mark.parametrize("give_up", ["cancelled", "read failed"])
def test_a_disk_prefetch_given_up_leaves_the_next_copy_waiting_for_the_kernels_that_read_the_slot(
    tiny8_dir, tmp_path, give_up
):
    cache = cache_of(tiny8_dir, 1, tier="disk", expert_dir=tmp_path)
    expected, read = read_late(cache, (0, 0))
    if give_up == "cancelled":
        gate = threading.Event()
        for _ in range(IO_THREADS):  # hold the I/O threads, so the prefetch's read waits in the queue
            cache.transfer._pool.submit(gate.wait, 5)
        cache.prefetch([(0, 1)])  # evicts (0, 0)
        assert cache.cancel_prefetches(0, []) == 1
        gate.set()
    else:
        real = cache.store.read_into
        cache.store.read_into = lambda key, buf: (_ for _ in ()).throw(OSError("I/O error"))
        cache.prefetch([(0, 1)])  # evicts (0, 0)
        with pytest.raises(OSError, match="I/O error"):
            cache.acquire([(0, 1)])
        cache.store.read_into = real
    later = cache.acquire([(0, 2)])[(0, 2)]  # into the same slot: the copy must still wait for `read`
    torch.cuda.synchronize()
    assert any(not torch.equal(later[k], expected[k]) for k in expected)  # the slot did change, after `read`
    for k in expected:
        torch.testing.assert_close(read[k], expected[k])


def test_host_store_is_one_pinned_arena_of_chunks(tiny8_dir):
    cache = cache_of(tiny8_dir, 2)
    store = cache.store
    assert store.pinned and all(c.is_pinned() for c in store._chunks)
    assert len(store._chunks) < len(store.keys)
    assert store.pinned_bytes >= store.host_bytes
