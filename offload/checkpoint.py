"""Safetensors files read and written tensor by tensor, with plain file reads into buffers sida owns.

No memory map: the pages of a mapped file count in the process's resident memory while it is mapped, so
reading a checkpoint through a map would put the whole model in RSS at load time, which is what offloading
the experts is meant to avoid. A read here costs the destination buffer and nothing else; a write streams
one tensor at a time, so a file of any size is written with one tensor's worth of memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


class CheckpointError(ValueError):
    """A weight file that cannot be read as safetensors; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: its file, the byte offset of its data, dtype and shape."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """({tensor name: TensorInfo}, metadata) of one safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path} is not a safetensors file: header of {header_len} bytes in {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file: its header is not JSON") from None
    base = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        if end - begin != math.prod(shape) * _itemsize(dtype) or base + end > size:
            raise CheckpointError(f"{path} is truncated or damaged: tensor {name} lies outside the file")
        tensors[name] = TensorInfo(path, base + begin, end - begin, dtype, shape)
    return tensors, header.get("__metadata__") or {}


class Checkpoint:
    """Every tensor of a model folder's *.safetensors files, read on demand."""

    def __init__(self, model_dir: Path):
        self.tensors: dict[str, TensorInfo] = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            self.tensors.update(read_header(path)[0])

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new CPU tensor with the stored values of `name`, converted to `dtype` if given."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        read_into(info, out)
        return out if dtype is None or dtype == info.dtype else out.to(dtype)

    def read_range(self, name: str, start: int, out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor `out` [n] with elements [start, start + n) of `name` (flattened),
        converting dtype if they differ: one contiguous byte range of the file, nothing else read."""
        info = self.tensors[name]
        n = out.numel()
        if start < 0 or start + n > info.numel:
            raise CheckpointError(f"{info.path}: elements {start}..{start + n} lie outside tensor {name} {info.shape}")
        size = _itemsize(info.dtype)
        part = TensorInfo(info.path, info.offset + start * size, n * size, info.dtype, (n,))
        if out.dtype == info.dtype:
            read_into(part, out)
        else:
            staged = torch.empty(n, dtype=info.dtype)
            read_into(part, staged)
            out.copy_(staged)


def read_into(info: TensorInfo, out: torch.Tensor) -> None:
    """Read `info`'s bytes straight into the contiguous CPU tensor `out` (same dtype and element count)."""
    fd = os.open(info.path, os.O_RDONLY)
    try:
        pread_exactly(fd, memoryview(out.view(-1).view(torch.uint8).numpy()), info.offset, info.path)
    finally:
        os.close(fd)


def pread_exactly(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill `view` from the file `fd` (named `path` in errors) at `offset`; an error if the file ends first."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if not n:
            raise CheckpointError(f"{path} is truncated: it ends inside a tensor")
        done += n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are all declared up front and then written in that order, one at
    a time; the file appears under its name only once complete and on disk (unique temporary name, fsync,
    atomic rename).

    With `align`, every tensor's data starts at a file offset that is a multiple of `align` (the header is
    padded, and unused `__pad_N` byte tensors fill the gaps, so the file stays valid safetensors), which lets
    a reader use O_DIRECT. The metadata may be replaced at `close` by a value of the same serialised length
    (checksums known only once the data is written)."""

    def __init__(
        self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict, align: int = 8
    ):
        self.path = path
        self._layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in entries:
            self._layout.append((name, dtype, shape))
            pad = -math.prod(shape) * _itemsize(dtype) % align
            if pad:
                self._layout.append((f"__pad_{len(self._layout)}", torch.uint8, (pad,)))
        self._align = align
        self._raw = self._header(metadata)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        self._file = self._tmp.open("wb")
        self._file.write(struct.pack("<Q", len(self._raw)) + self._raw)
        self._next = 0

    def _header(self, metadata: dict, length: int | None = None) -> bytes:
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in self._layout:
            nbytes = math.prod(shape) * _itemsize(dtype)
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        if length is None:  # data starts aligned: 8 + header is a multiple of `align` (and of 8)
            length = len(raw) + (-(8 + len(raw)) % max(8, self._align))
        if len(raw) > length:
            raise ValueError("the final metadata is longer than the metadata the file was started with")
        return raw + b" " * (length - len(raw))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor."""
        expected, _, _ = self._layout[self._next]
        if expected != name:
            raise ValueError(f"expected tensor {expected}, got {name}")
        self._file.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
        self._next += 1
        if self._next < len(self._layout) and self._layout[self._next][0].startswith("__pad_"):
            _, _, (pad,) = self._layout[self._next]
            self._file.write(bytes(pad))
            self._next += 1

    def close(self, metadata: dict | None = None) -> None:
        """Flush to disk and move the file under its name (a crash before leaves no half file there); `metadata`
        replaces the metadata given at the start."""
        if self._next != len(self._layout):
            raise ValueError(f"{len(self._layout) - self._next} declared tensors were not written")
        if metadata is not None:
            self._file.seek(8)
            self._file.write(self._header(metadata, len(self._raw)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tmp.replace(self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)
