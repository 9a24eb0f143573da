"""The disk tier's expert file under faults: a corrupted expert is rewritten from the checkpoint (or named in one
line), O_DIRECT refused by two reads at once, malformed headers, temporary files left by a killed writer, and
descriptors and I/O threads released when an engine closes."""

import errno
import json
import os
import struct
import threading
import time
import zlib

import pytest
import torch
from torch import nn

from sida.offload import expert_file
from sida.offload.checkpoint import CheckpointError, read_header
from sida.offload.engine import OffloadConfig, OffloadEngine
from sida.offload.expert_file import ExpertFileCorrupt
from sida.offload.expert_layout import ModuleExperts
from sida.offload.expert_store import ExpertStore
from sida.offload.model_loader import load_model

CPU = torch.device("cpu")
NO_SUCH_PID = 4194305  # above the largest pid_max Linux allows: never a live process


class Source:
    """Experts from modules, standing in for the checkpoint: a source the expert file keeps to repair from."""

    def __init__(self, modules):
        self._modules = ModuleExperts(modules.items())
        self.layout, self.keys = self._modules.layout, self._modules.keys
        self.broken = None  # "unreadable" or "different": what a repair finds in the checkpoint

    def read_into(self, key, out):
        if self.broken == "unreadable":
            raise OSError(errno.EIO, "checkpoint unreadable")
        self._modules.read_into(key, out)
        if self.broken == "different":
            out += 1


def modules(n=6, width=64):
    torch.manual_seed(0)
    return {(0, e): nn.Linear(width, width, bias=False) for e in range(n)}


def build(path, source, io="direct"):
    return ExpertStore.build(source, "disk", False, path, "fp", io)


def corrupt(path, key):
    """Flip one byte inside expert `key`, in place (the file keeps its inode, as on a failing disk)."""
    info = read_header(path)[0][f"layer{key[0]}.expert{key[1]}"]
    with open(path, "r+b") as f:
        f.seek(info.offset + 100)
        byte = f.read(1)[0]
        f.seek(info.offset + 100)
        f.write(bytes([byte ^ 0xFF]))


def on_disk_crc(path, key):
    info = read_header(path)[0][f"layer{key[0]}.expert{key[1]}"]
    with open(path, "rb") as f:
        f.seek(info.offset)
        return zlib.crc32(f.read(info.nbytes))


def weight(store, key):
    return store.layout.views(store.host(key))["weight"]


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_a_corrupted_expert_is_rewritten_from_the_checkpoint_and_counted(tmp_path):
    path, mods = tmp_path / "e.safetensors", modules()
    build(path, Source(mods)).close()
    good = on_disk_crc(path, (0, 2))
    corrupt(path, (0, 2))
    store = build(path, Source(mods))  # a restart: the header is intact, so the file is reused
    torch.testing.assert_close(weight(store, (0, 2)), mods[(0, 2)].weight)
    assert store.repairs == 1 and store.fault is None
    assert on_disk_crc(path, (0, 2)) == good  # repaired in place, not only in memory
    torch.testing.assert_close(weight(store, (0, 2)), mods[(0, 2)].weight)
    assert store.repairs == 1
    store.close()


@pytest.mark.parametrize("broken", ["unreadable", "different", "rewrite fails"])
def test_an_expert_that_cannot_be_repaired_is_one_line_naming_the_file_and_the_expert(tmp_path, broken, monkeypatch):
    path, mods = tmp_path / "e.safetensors", modules()
    source = Source(mods)
    store = build(path, source)
    corrupt(path, (0, 2))
    if broken == "rewrite fails":
        monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "read-only")))
    else:
        source.broken = broken
    with pytest.raises(ExpertFileCorrupt) as raised:
        store.host((0, 2))
    message = str(raised.value)
    assert isinstance(raised.value, CheckpointError)
    assert "\n" not in message and str(path) in message and "(0, 2)" in message
    assert store.fault == message and store.repairs == 0
    torch.testing.assert_close(weight(store, (0, 1)), mods[(0, 1)].weight)  # the others still read
    monkeypatch.undo()
    source.broken = None  # the checkpoint is back: the next read repairs it and the fault clears
    torch.testing.assert_close(weight(store, (0, 2)), mods[(0, 2)].weight)
    assert store.repairs == 1 and store.fault is None
    store.close()


def test_the_engine_reports_repairs_and_the_fault(tiny8_dir, tmp_path):
    cfg = OffloadConfig(mode="exact", budget_experts=4, tier="disk", expert_dir=tmp_path)
    engine = OffloadEngine(load_model(tiny8_dir, experts="host"), cfg, CPU)
    store = engine.cache.store
    path, (first, second) = store.path, store.keys[1:3]
    expected = store.host(first).clone()
    engine.close()
    corrupt(path, first)
    corrupt(path, second)
    loaded = load_model(tiny8_dir, experts="host")
    engine = OffloadEngine(loaded, cfg, CPU)
    assert engine.repairs == 0 and engine.fault is None
    torch.testing.assert_close(engine.cache.store.host(first), expected)
    assert engine.repairs == 1 and engine.fault is None
    loaded.experts.read_into = lambda key, out: (_ for _ in ()).throw(OSError(errno.EIO, "gone"))
    with pytest.raises(ExpertFileCorrupt):
        engine.cache.store.host(second)
    assert str(path) in engine.fault and str(second) in engine.fault
    engine.close()


def test_two_reads_refused_o_direct_at_once_fall_back_once_and_are_verified(tmp_path, monkeypatch):
    import fcntl

    path, mods = tmp_path / "e.safetensors", modules()
    store = build(path, Source(mods))
    if store.file.io != "direct":
        pytest.skip("this filesystem has no O_DIRECT")
    corrupt(path, (0, 2))  # read through the fallback: it must still be checked (and repaired)
    both_in = threading.Barrier(2)
    refused, real = [], os.preadv

    def preadv(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and len(refused) < 2:
            refused.append(fd)
            both_in.wait(5)  # both threads hold the O_DIRECT descriptor when it is refused
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    bufs = {key: torch.zeros(store.read_bytes * 2, dtype=torch.uint8) for key in [(0, 1), (0, 2)]}
    errors = []

    def read(key):
        try:
            store.read_into(key, bufs[key])
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(key,)) for key in bufs]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert not errors and len(refused) == 2 and store.file.io == "dontneed"
    for key, buf in bufs.items():
        got = store.layout.views(buf[: store.layout.nbytes].view(store.layout.dtype))["weight"]
        torch.testing.assert_close(got, mods[key].weight)
    assert store.repairs == 1


def malformed_headers(valid: dict) -> dict:
    meta = valid["__metadata__"]
    first = next(k for k in valid if k.startswith("layer"))
    return {
        "not an object": [1, 2],
        "metadata not an object": {"__metadata__": ["x"]},
        "tensor without offsets": {**valid, first: {"dtype": "F32", "shape": [4]}},
        "shape not a list of ints": {**valid, first: {**valid[first], "shape": "ab"}},
        "offsets not a pair": {**valid, first: {**valid[first], "data_offsets": [0]}},
        "checksums not a string": {**valid, "__metadata__": {**meta, "crc32": 7}},
        "checksums not hex": {**valid, "__metadata__": {**meta, "crc32": ",".join(["zz"] * 6)}},
    }


@pytest.mark.parametrize("case", list(malformed_headers({"__metadata__": {}, "layer0.expert0": {}})))
def test_a_header_that_is_json_but_malformed_is_stale_and_rebuilt(tmp_path, case, caplog):
    path, mods = tmp_path / "e.safetensors", modules()
    build(path, Source(mods)).close()
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(malformed_headers(json.loads(raw[8 : 8 + n]))[case]).encode()
    header = header.ljust(n)  # the same length where it fits: the tensors' offsets stay inside the file
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n :])
    store = build(path, Source(mods))
    assert "rewriting the expert file" in caplog.text
    torch.testing.assert_close(weight(store, (0, 3)), mods[(0, 3)].weight)
    store.close()


def test_temporary_files_of_a_killed_writer_are_removed_and_a_live_ones_kept(tmp_path, monkeypatch):
    hour_ago, pid, live = time.time() - 3600, os.getpid(), os.getppid()

    def left(names: dict, mtime=None) -> dict:
        for name in names:
            (tmp_path / name).write_bytes(b"partial")
            if mtime is not None:
                os.utime(tmp_path / name, (mtime, mtime))
        return names

    names = left({f"e.safetensors.{pid}.00000001.tmp": True, f"e.safetensors.{live}.00000002.tmp": True})
    # written since this process began: ours in progress, and another process's
    names |= left({f"e.safetensors.{live}.00000003.tmp": False}, hour_ago)  # untouched for an hour: dead
    names |= left({f"f.safetensors.{NO_SUCH_PID}.0badc0de.tmp": True, "notes.tmp": True}, hour_ago)  # not its
    build(tmp_path / "e.safetensors", Source(modules())).close()
    assert {n: (tmp_path / n).exists() for n in names} == names

    monkeypatch.setattr(expert_file, "STARTED", time.time() + 60)  # what is written now predates this process
    names = left(
        {
            f"e.safetensors.{NO_SUCH_PID}.00000004.tmp": False,  # its writer is gone
            f"e.safetensors.{pid}.00000005.tmp": False,  # a predecessor's that had this pid (a container restart)
            f"e.safetensors.{live}.00000006.tmp": True,  # a live writer's, still writing
        }
    )
    build(tmp_path / "e.safetensors", Source(modules())).close()
    assert {n: (tmp_path / n).exists() for n in names} == names


def test_engines_built_and_closed_leave_no_descriptors_or_threads(tiny8_dir, tmp_path):
    cfg = OffloadConfig(mode="exact", budget_experts=4, tier="disk", expert_dir=tmp_path)

    def build_read_close():
        engine = OffloadEngine(load_model(tiny8_dir, experts="host"), cfg, CPU)
        keys = engine.cache.store.keys[:3]
        engine.cache.prefetch(keys)  # reads on the I/O threads
        engine.cache.release(engine.cache.acquire(keys))
        engine.close()
        engine.close()  # twice is harmless

    build_read_close()  # the first build may open what stays open for the process (libraries, logs)
    fds, threads = fd_count(), threading.active_count()
    for _ in range(3):
        build_read_close()
    assert fd_count() <= fds and threading.active_count() <= threads


def test_a_closed_file_refuses_reads(tmp_path):
    store = build(tmp_path / "e.safetensors", Source(modules()))
    store.close()
    with pytest.raises(OSError):
        store.host((0, 1))
