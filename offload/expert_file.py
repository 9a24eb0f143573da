"""The disk tier's file: every expert of one model, packed, in one safetensors file written once and trusted after.

Written by streaming (one expert in memory at a time) under a unique temporary name, fsynced, then renamed.
Each expert starts at a multiple of `ALIGN` bytes, so an expert is read with O_DIRECT straight into an
aligned buffer: a read costs what the disk costs, never served from the page cache (which would flatter
every method in a benchmark and hold RAM the budget does not account). Where the filesystem refuses
O_DIRECT, reads go through the page cache and are dropped from it afterwards (`posix_fadvise(DONTNEED)`).

The header records the format, the model's fingerprint, the dtype, the layout and a CRC-32 per expert; it
is checked on open (a stale, truncated or foreign file is rebuilt), and each expert's checksum on its
first read.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import zlib
from pathlib import Path

import torch

from sida.offload.checkpoint import CheckpointError, SafetensorsWriter, TensorInfo, pread_exactly, read_header
from sida.offload.expert_layout import ExpertKey, ExpertLayout, ExpertSource

FORMAT = "sida-experts/2"
ALIGN = 4096  # O_DIRECT: buffer address, file offset and length are multiples of this
IO_MODES = ("direct", "dontneed")

log = logging.getLogger("sida")


class StaleExpertFile(CheckpointError):
    """The file on disk is not this model's expert file as this version writes it."""


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
    """An open expert file: `read_into(key, buf)` reads one expert into an aligned host buffer."""

    def __init__(self, path: Path, layout: ExpertLayout, keys: list[ExpertKey], fingerprint: str, io: str):
        if io not in IO_MODES:
            raise ValueError(f"unknown disk io {io!r}; expected one of {', '.join(IO_MODES)}")
        self.path = path
        self.layout = layout
        self.read_bytes = padded(layout.nbytes)
        self._info, self._crc = _check(path, layout, keys, fingerprint)
        self._verified: set[ExpertKey] = set()
        self.io = io
        self._fd = os.open(path, os.O_RDONLY)
        self._direct_fd = None
        if io == "direct":
            try:
                self._direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                log.warning("%s: no O_DIRECT here (%s); reading through the page cache and dropping it", path, e)
                self.io = "dontneed"
        if self.io == "dontneed":  # what writing the file left in the page cache goes too
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read_into(self, key: ExpertKey, buf: torch.Tensor) -> None:
        """Fill `buf` (uint8, `read_bytes` long, its address a multiple of ALIGN) with expert `key`; the
        expert's packed values are its first `layout.nbytes` bytes."""
        info = self._info[key]
        view = memoryview(buf.numpy())[: self.read_bytes]
        if self._direct_fd is not None:
            try:
                pread_exactly(self._direct_fd, view, info.offset, self.path)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                log.warning("%s: O_DIRECT read refused (%s); reading through the page cache", self.path, e)
                os.close(self._direct_fd)
                self._direct_fd, self.io = None, "dontneed"
        if self._direct_fd is None:
            pread_exactly(self._fd, view, info.offset, self.path)
            os.posix_fadvise(self._fd, info.offset, self.read_bytes, os.POSIX_FADV_DONTNEED)
        if key not in self._verified:
            if zlib.crc32(view[: info.nbytes]) != self._crc[key]:
                raise CheckpointError(f"{self.path}: expert {key} does not match its checksum (delete the file)")
            self._verified.add(key)


def _check(
    path: Path, layout: ExpertLayout, keys: list[ExpertKey], fingerprint: str
) -> tuple[dict[ExpertKey, TensorInfo], dict[ExpertKey, int]]:
    """Each expert's place in the file and checksum; StaleExpertFile if the file is not what it should be."""
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


def open_expert_file(path: Path, source: ExpertSource, fingerprint: str, io: str = "direct") -> ExpertFile:
    """The expert file at `path`, written first if absent, rewritten if stale (with a log line)."""
    if path.is_file():
        try:
            return ExpertFile(path, source.layout, source.keys, fingerprint, io)
        except CheckpointError as e:
            log.warning("rewriting the expert file: %s", e)
    try:
        write_expert_file(path, source, fingerprint)
    except OSError as e:
        raise CheckpointError(
            f"cannot write the expert file {path}: {e.strerror or e} (set expert_dir to a writable folder)"
        ) from None
    return ExpertFile(path, source.layout, source.keys, fingerprint, io)
