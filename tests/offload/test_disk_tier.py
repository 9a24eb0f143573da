"""The disk tier: reads that bypass the page cache, an expert file that is checked and rebuilt when stale,
asynchronous loads on CPU, and the prefetch-precision accounting."""

import json

import pytest
import torch
from torch import nn

from sida.offload.checkpoint import CheckpointError, read_header
from sida.offload.device_cache import DeviceExpertCache
from sida.offload.expert_file import ALIGN, ExpertFile
from sida.offload.expert_layout import ModuleExperts
from sida.offload.expert_store import ExpertStore
from sida.offload.memory import aligned_empty, pinned_reserve, pinned_reserved
from sida.offload.policies import make_policy
from sida.offload.transfer import CUDA_STAGING, Transfer
from tests.offload.test_slot_ordering import RecordingStreams

CPU = torch.device("cpu")


def experts(n=6, width=256):
    """(layer, expert) → a Linear of `width`² floats: 256 KiB, many pages, so page-cache effects show."""
    torch.manual_seed(0)
    return {(0, e): nn.Linear(width, width, bias=False) for e in range(n)}


def disk_cache(tmp_path, num_slots=2, io="direct", fingerprint="fp", modules=None):
    modules = modules or experts()
    store = ExpertStore.build(
        ModuleExperts(modules.items()), "disk", False, tmp_path / "e.safetensors", fingerprint, io
    )
    transfer = Transfer(CPU, store.layout.numel, store.layout.dtype)
    return DeviceExpertCache(store, num_slots, make_policy("lru"), CPU, transfer), modules


def device_read_bytes() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


@pytest.mark.parametrize("io", ["direct", "dontneed"])
def test_a_second_read_of_an_expert_comes_from_the_disk_again(tmp_path, io):
    cache, modules = disk_cache(tmp_path, io=io)
    store = cache.store
    assert store.file.io == io
    for _ in range(2):
        before = device_read_bytes()
        views = store.layout.views(store.host((0, 3)))
        assert device_read_bytes() - before >= store.layout.nbytes  # not served from the page cache
        torch.testing.assert_close(views["weight"], modules[(0, 3)].weight)


def test_expert_data_is_aligned_for_direct_reads(tmp_path):
    cache, _ = disk_cache(tmp_path)
    tensors, meta = read_header(cache.store.path)
    assert meta["format"] == "sida-experts/2" and meta["fingerprint"] == "fp"
    assert all(t.offset % ALIGN == 0 for name, t in tensors.items() if name.startswith("layer"))
    assert cache.store.path.stat().st_size % ALIGN == 0


def test_a_file_of_another_model_is_rewritten(tmp_path, caplog):
    cache, _ = disk_cache(tmp_path, fingerprint="old")
    other = experts(width=256)
    for m in other.values():
        nn.init.constant_(m.weight, 0.5)
    cache, _ = disk_cache(tmp_path, fingerprint="new", modules=other)
    assert "holds the experts of model old" in caplog.text
    assert read_header(cache.store.path)[1]["fingerprint"] == "new"
    assert torch.all(cache.store.layout.views(cache.store.host((0, 1)))["weight"] == 0.5)


def test_a_corrupted_expert_fails_its_checksum_on_first_read(tmp_path):
    cache, _ = disk_cache(tmp_path)
    path = cache.store.path
    info = read_header(path)[0]["layer0.expert2"]
    data = bytearray(path.read_bytes())
    data[info.offset + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    store = ExpertFile(path, cache.store.layout, cache.store.keys, "fp", "direct")
    buf = cache.slots[0].raw
    store.read_into((0, 1), buf)  # an intact expert reads fine
    with pytest.raises(CheckpointError, match=r"expert \(0, 2\) does not match its checksum"):
        store.read_into((0, 2), buf)


def test_an_unwritable_expert_dir_is_one_clear_line(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(CheckpointError, match="cannot write the expert file .*set expert_dir"):
        ExpertStore.build(ModuleExperts(experts().items()), "disk", False, blocker / "e.safetensors", "fp")


def test_prefetches_are_asynchronous_and_acquire_waits_for_them(tmp_path):
    cache, modules = disk_cache(tmp_path, num_slots=3)
    assert cache.prefetch([(0, 0), (0, 1)]) == 2
    assert all(s.pending is not None for s in cache.slots if s.key is not None)  # reads in flight on the I/O pool
    views = cache.acquire([(0, 1)])
    torch.testing.assert_close(views[(0, 1)]["weight"], modules[(0, 1)].weight)
    assert cache.stats.prefetch_loads == 2 and cache.stats.on_demand_loads == 0


def test_a_failed_prefetch_read_frees_its_slot_and_the_acquire_reads_it_once_more(tmp_path):
    cache, modules = disk_cache(tmp_path, num_slots=2)
    real, failed = cache.store.read_into, []

    def failing_once(key, buf):
        if key == (0, 4) and not failed:
            failed.append(key)
            raise OSError("I/O error")
        real(key, buf)

    cache.store.read_into = failing_once
    cache.prefetch([(0, 4)])
    views = cache.acquire([(0, 4), (0, 5)])  # the failed read is not a hit: read again, into the freed slot
    torch.testing.assert_close(views[(0, 4)]["weight"], modules[(0, 4)].weight)
    stats = cache.stats
    assert (cache.transfer.failed_reads, stats.load_retries, stats.hits, stats.on_demand_loads) == (1, 1, 0, 2)
    assert sorted(cache.pinned_keys) == [(0, 4), (0, 5)]


def test_prefetch_precision_counts_used_and_evicted_unused_bytes(tmp_path):
    cache, _ = disk_cache(tmp_path, num_slots=2)
    size = cache.store.expert_bytes
    cache.prefetch([(0, 0), (0, 1)])
    cache.release(cache.acquire([(0, 0)]))  # used
    cache.release(cache.acquire([(0, 2)]))  # loaded on demand over (0, 1): evicted unused
    stats = cache.stats
    assert sum(stats.prefetch_used_bytes.values()) == size
    assert sum(stats.prefetch_unused_bytes.values()) == size
    assert stats.prefetch_precision == 0.5
    assert json.dumps(dict(stats.stall_by_layer))  # per-layer stall seconds, JSON-ready


def test_prefetches_a_layer_did_not_need_are_cancelled_before_their_read(tmp_path):
    cache, _ = disk_cache(tmp_path, num_slots=4)
    gate = __import__("threading").Event()
    real = cache.store.read_into
    cache.store.read_into = lambda key, buf: (gate.wait(5), real(key, buf))  # hold the I/O threads
    cache.prefetch([(0, 0), (0, 1), (0, 2), (0, 3)])  # two reads start, two wait in the queue
    dropped = cache.cancel_prefetches(0, [(0, 0), (0, 1)])
    gate.set()
    assert dropped == 2 and not cache.is_resident((0, 2)) and not cache.is_resident((0, 3))
    assert cache.stats.prefetch_loads == 2 and cache.stats.prefetch_cancelled == 2
    assert cache.stats.bytes_moved == 2 * cache.store.expert_bytes
    cache.acquire([(0, 0), (0, 1)])


def test_the_pinned_figure_of_an_aligned_buffer_is_its_whole_over_allocation_rounded():
    nbytes = 1 << 16
    buf = aligned_empty(nbytes, align=4096)
    assert buf.numel() == nbytes and buf.data_ptr() % 4096 == 0
    assert pinned_reserved(buf) == pinned_reserve(nbytes + 4096) == 2 * nbytes  # one page over a power of two


def test_staging_bytes_count_every_staging_buffer_also_those_a_read_holds():
    numel, read_bytes = 1024, 1 << 16
    transfer = Transfer(CPU, numel, torch.float32, streams=RecordingStreams())
    transfer.start_io(read_bytes)
    transfer._pin = True  # as beside a CUDA device: only the figure is checked (nothing here is page-locked)
    expected = CUDA_STAGING * pinned_reserve(read_bytes + 4096) + pinned_reserve(numel * 4)  # + the bounce buffer
    held = transfer._staging.get()  # a read in flight holds one
    assert transfer.staging_bytes == expected
    transfer._staging.put(held)
    assert transfer.staging_bytes == expected
    transfer.close()
