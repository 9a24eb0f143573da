"""The disk tier's file: every expert of one model, packed, in one safetensors file written once and trusted after.

Written by streaming (one expert in memory at a time) under a unique temporary name, fsynced, then renamed.
Each expert starts at a multiple of `ALIGN` bytes, so an expert is read with O_DIRECT straight into an
aligned buffer: a read costs what the disk costs, never served from the page cache (which would flatter
every method in a benchmark and hold RAM the budget does not account). Where the filesystem refuses
O_DIRECT, reads go through the page cache and are dropped from it afterwards (`posix_fadvise(DONTNEED)`).

The header records the format, the model's fingerprint, the dtype, the layout and a CRC-32 per expert; it
is checked on open (a stale, truncated, malformed or foreign file is rebuilt), and each expert's checksum on
its first read. An expert that fails it is rewritten in place from the checkpoint and read again; where that
cannot be done, reading it raises `ExpertFileCorrupt` and the file reports the line as its `fault`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import threading
import time
import zlib
from pathlib import Path

import torch

from sida.offload.checkpoint import CheckpointError, SafetensorsWriter, TensorInfo, pread_exactly, read_header
from sida.offload.expert_layout import ExpertKey, ExpertLayout, ExpertSource

FORMAT = "sida-experts/2"
ALIGN = 4096  # O_DIRECT: buffer address, file offset and length are multiples of this
IO_MODES = ("direct", "dontneed")
STALE_TMP_S = 600  # a writer writes without pause: its temporary file untouched this long is a dead writer's
STARTED = time.time()  # about when this process began: a temporary file older than this is not its own

log = logging.getLogger("sida")


class StaleExpertFile(CheckpointError):
    """The file on disk is not this model's expert file as this version writes it."""


class ExpertFileCorrupt(CheckpointError):
    """An expert fails its checksum and could not be rewritten from the checkpoint; the message is one line."""


def padded(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of ALIGN: what one aligned read of an expert reads."""
    return -(-nbytes // ALIGN) * ALIGN


def _name(key: ExpertKey) -> str:
    return f"layer{key[0]}.expert{key[1]}"


def _layout_json(layout: ExpertLayout) -> str:
    return json.dumps({"names": layout.names, "shapes": layout.shapes})


def _metadata(layout: ExpertLayout, fingerprint: str, checksums: list[int]) -> dict:
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "dtype": str(layout.dtype).removeprefix("torch."),
        "layout": _layout_json(layout),
        "crc32": ",".join(f"{c:08x}" for c in checksums),  # fixed width: the header is rewritten at the end
    }


def write_expert_file(path: Path, source: ExpertSource, fingerprint: str) -> None:
    """Pack every expert of `source` into the file at `path`, one expert in memory at a time."""
    layout = source.layout
    if not layout.dtype.is_floating_point:
        raise ValueError(f"tier 'disk' stores floating-point experts, not {layout.dtype}")
    entries = [(_name(key), layout.dtype, (layout.numel,)) for key in source.keys]
    writer = SafetensorsWriter(path, entries, _metadata(layout, fingerprint, [0] * len(entries)), align=ALIGN)
    buf = torch.empty(layout.numel, dtype=layout.dtype)
    checksums = []
    try:
        for key in source.keys:
            source.read_into(key, buf)
            checksums.append(zlib.crc32(buf.view(torch.uint8).numpy()))
            writer.write(_name(key), buf)
        writer.close(_metadata(layout, fingerprint, checksums))
    except BaseException:
        writer.abort()
        raise


class ExpertFile:
    """An open expert file: `read_into(key, buf)` reads one expert into an aligned host buffer. With a `source` (the
    checkpoint the file was written from), an expert that fails its checksum is rewritten from it."""

    def __init__(
        self,
        path: Path,
        layout: ExpertLayout,
        keys: list[ExpertKey],
        fingerprint: str,
        io: str,
        source: ExpertSource | None = None,
    ):
        if io not in IO_MODES:
            raise ValueError(f"unknown disk io {io!r}; expected one of {', '.join(IO_MODES)}")
        self.path = path
        self.layout = layout
        self.read_bytes = padded(layout.nbytes)
        self._info, self._crc = _check(path, layout, keys, fingerprint)
        self._verified: set[ExpertKey] = set()
        self._source = source
        self._faults: dict[ExpertKey, str] = {}  # experts that fail their checksum and could not be rewritten
        self.repairs = 0  # experts rewritten from the source after failing their checksum
        self._lock = threading.RLock()  # the switch to the page cache, repairs and close, one at a time
        self.io = io
        self._fd = os.open(path, os.O_RDONLY)
        self._direct_fd = None
        if io == "direct":
            try:
                self._direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                log.warning("%s: no O_DIRECT here (%s); reading through the page cache and dropping it", path, e)
                self.io = "dontneed"
        self._fds = [fd for fd in (self._fd, self._direct_fd) if fd is not None]  # closed by `close` only
        if self.io == "dontneed":  # what writing the file left in the page cache goes too
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    @property
    def fault(self) -> str | None:
        """One line on an expert that cannot be read (the first of them), or None."""
        faults = list(self._faults.values())  # one C-level copy: an I/O thread may add one meanwhile
        return faults[0] if faults else None

    def read_into(self, key: ExpertKey, buf: torch.Tensor) -> None:
        """Fill `buf` (uint8, `read_bytes` long, its address a multiple of ALIGN) with expert `key`; the
        expert's packed values are its first `layout.nbytes` bytes."""
        info = self._info[key]
        view = memoryview(buf.numpy())[: self.read_bytes]
        self._read(info.offset, view)
        if key in self._verified:
            return
        if zlib.crc32(view[: info.nbytes]) != self._crc[key]:
            self._repair(key, view)
        self._verified.add(key)

    def _read(self, offset: int, view: memoryview) -> None:
        """Fill `view` from `offset`: with O_DIRECT, else through the page cache, dropped from it after."""
        fd = self._direct_fd  # read once: another thread may switch to the page cache meanwhile
        if fd is not None:
            try:
                pread_exactly(fd, view, offset, self.path)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._fall_back(fd, e)
        pread_exactly(self._fd, view, offset, self.path)
        os.posix_fadvise(self._fd, offset, self.read_bytes, os.POSIX_FADV_DONTNEED)

    def _fall_back(self, fd: int, error: OSError) -> None:
        """O_DIRECT refused a read: this and every later read go through the page cache. Threads refused at once
        switch once; the O_DIRECT descriptor stays open until `close`, so a thread still reading through it never
        reads another file that took its number."""
        with self._lock:
            if self._direct_fd == fd:
                log.warning("%s: O_DIRECT read refused (%s); reading through the page cache", self.path, error)
                self._direct_fd, self.io = None, "dontneed"

    def _repair(self, key: ExpertKey, view: memoryview) -> None:
        """Expert `key` failed its checksum: rewrite it in place from the source, read it into `view` again and
        check it; ExpertFileCorrupt (kept as `fault`) where that cannot be done."""
        info = self._info[key]
        with self._lock:  # one repair at a time; a thread that waited here may find it done
            self._read(info.offset, view)
            if zlib.crc32(view[: info.nbytes]) == self._crc[key]:
                return
            try:
                self._rewrite(key)
                self._read(info.offset, view)
            except Exception as e:  # whatever the source or the disk raise, the fault is reported as one line
                self._corrupt(key, " ".join(str(e).split()) or type(e).__name__)
            if zlib.crc32(view[: info.nbytes]) != self._crc[key]:
                self._corrupt(key, "it still fails after being rewritten")
            self.repairs += 1
            self._faults.pop(key, None)
        log.warning("%s: expert %s failed its checksum; rewritten from the checkpoint", self.path, key)

    def _rewrite(self, key: ExpertKey) -> None:
        """Write expert `key`, read from the source, over its place in the file, and flush it to disk."""
        if self._source is None:
            raise CheckpointError("no checkpoint to rewrite it from")
        expert = torch.empty(self.layout.numel, dtype=self.layout.dtype)
        self._source.read_into(key, expert)
        data = memoryview(expert.view(torch.uint8).numpy())
        if zlib.crc32(data) != self._crc[key]:
            raise CheckpointError("the checkpoint's copy does not match the recorded checksum either")
        offset = self._info[key].offset
        fd = os.open(self.path, os.O_WRONLY)
        try:
            done = 0
            while done < len(data):
                n = os.pwrite(fd, data[done:], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "the write made no progress")
                done += n
            os.fsync(fd)
        finally:
            os.close(fd)
        os.posix_fadvise(self._fd, offset, self.read_bytes, os.POSIX_FADV_DONTNEED)  # the pages just written

    def _corrupt(self, key: ExpertKey, reason: str) -> None:
        message = (
            f"{self.path}: expert {key} does not match its checksum and could not be rewritten from the checkpoint "
            f"({reason}); delete the file to rebuild it"
        )
        self._faults[key] = message
        raise ExpertFileCorrupt(message) from None

    def close(self) -> None:
        """Close the file's descriptors, once no read is under way (the I/O threads stopped first); idempotent. A
        read after it raises OSError."""
        with self._lock:
            fds, self._fds = self._fds, []
            self._fd, self._direct_fd = -1, None
        for fd in fds:
            os.close(fd)


def _check(
    path: Path, layout: ExpertLayout, keys: list[ExpertKey], fingerprint: str
) -> tuple[dict[ExpertKey, TensorInfo], dict[ExpertKey, int]]:
    """Each expert's place in the file and checksum; StaleExpertFile if the file is not what it should be."""
    try:
        return _parse(path, layout, keys, fingerprint)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        # a header that is JSON but not the shape this version writes: as stale as a foreign file
        raise StaleExpertFile(f"{path} has a malformed header ({type(e).__name__}: {e})") from None


def _parse(
    path: Path, layout: ExpertLayout, keys: list[ExpertKey], fingerprint: str
) -> tuple[dict[ExpertKey, TensorInfo], dict[ExpertKey, int]]:
    tensors, meta = read_header(path)
    if meta.get("format") != FORMAT:
        raise StaleExpertFile(f"{path} is not a {FORMAT} expert file")
    if meta.get("fingerprint") != fingerprint:
        raise StaleExpertFile(f"{path} holds the experts of model {meta.get('fingerprint')}, not {fingerprint}")
    if meta.get("layout") != _layout_json(layout):
        raise StaleExpertFile(f"{path} packs experts in another layout")
    crc = meta.get("crc32", "").split(",")
    if len(crc) != len(keys):
        raise StaleExpertFile(f"{path} has {len(crc)} checksums for {len(keys)} experts")
    size = path.stat().st_size
    info, checksums = {}, {}
    for key, c in zip(keys, crc):
        t = tensors.get(_name(key))
        if t is None or t.dtype != layout.dtype or t.shape != (layout.numel,) or t.offset % ALIGN:
            raise StaleExpertFile(f"{path} does not hold expert {key} as {layout.dtype} [{layout.numel}], aligned")
        if t.offset + padded(t.nbytes) > size:
            raise StaleExpertFile(f"{path} is truncated")
        info[key], checksums[key] = t, int(c, 16)
    return info, checksums


def open_expert_file(
    path: Path, source: ExpertSource, fingerprint: str, io: str = "direct", repair: bool = True
) -> ExpertFile:
    """The expert file at `path`, written first if absent, rewritten if stale (with a log line). With `repair`, the
    file keeps `source` to rewrite an expert that fails its checksum."""
    _remove_stale_temporaries(path)
    kept = source if repair else None
    if path.is_file():
        try:
            return ExpertFile(path, source.layout, source.keys, fingerprint, io, kept)
        except CheckpointError as e:
            log.warning("rewriting the expert file: %s", e)
    try:
        write_expert_file(path, source, fingerprint)
    except OSError as e:
        raise CheckpointError(
            f"cannot write the expert file {path}: {e.strerror or e} (set expert_dir to a writable folder)"
        ) from None
    return ExpertFile(path, source.layout, source.keys, fingerprint, io, kept)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files (`<name>.<pid>.<hex>.tmp`) that a killed writer of `path` left beside it."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)\.[0-9a-f]+\.tmp")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return  # no folder yet: nothing left in it
    for tmp in entries:
        match = pattern.fullmatch(tmp.name)
        if match and _is_stale(tmp, int(match.group(1))):
            log.info("removing %s, left by a writer that did not finish", tmp)
            try:
                tmp.unlink()
            except OSError:
                pass  # gone already, or not ours to remove: it only costs disk space


def _is_stale(tmp: Path, pid: int) -> bool:
    """Whether no live writer holds `tmp`. Its writer writes without pause, so one untouched for STALE_TMP_S is
    dead. One last written before this process began is not this process's own in-progress file: it is dead if
    its pid is this process (a restarted daemon often gets its predecessor's pid, in a container) or no process."""
    try:
        mtime = tmp.stat().st_mtime
    except OSError:
        return False
    if time.time() - mtime > STALE_TMP_S:
        return True
    if mtime >= STARTED:
        return False  # a writer that runs now, here or in another process
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # EPERM: a live process of another user
    return False
