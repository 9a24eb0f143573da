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

    def read_flat(self, name: str, out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor `out` [numel] with `name`'s values, converting dtype if they differ."""
        info = self.tensors[name]
        if out.dtype == info.dtype:
            read_into(info, out)
        else:
            out.copy_(self.read(name).reshape(-1))


def read_into(info: TensorInfo, out: torch.Tensor) -> None:
    """Read `info`'s bytes straight into the contiguous CPU tensor `out` (same dtype and element count)."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    with info.path.open("rb", buffering=0) as f:
        f.seek(info.offset)
        done = 0
        while done < info.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{info.path} is truncated: it ends inside a tensor")
            done += n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are all declared up front and then written in that order, one at
    a time; the file appears under its name only once complete."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict):
        self.path = path
        self._order = [name for name, _, _ in entries]
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * _itemsize(dtype)
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the format recommends
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(path.name + ".tmp")
        self._file = self._tmp.open("wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor."""
        if self._order[self._next] != name:
            raise ValueError(f"expected tensor {self._order[self._next]}, got {name}")
        self._file.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        """Flush to disk and move the file under its name (a crash before leaves no half file there)."""
        if self._next != len(self._order):
            raise ValueError(f"{len(self._order) - self._next} declared tensors were not written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tmp.replace(self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)
