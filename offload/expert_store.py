"""The host copy of every expert: one flat tensor per (layer, expert), in RAM or memory-mapped from disk.

An expert's parameters are packed into one contiguous buffer so that a load is a single copy into a
cache slot. Tier `ram` pins the buffers when CUDA is present (so copies can be asynchronous); tier
`disk` writes one safetensors file per model once and maps it, so the host holds only what it reads.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

ExpertKey = tuple[int, int]  # (MoE layer index, expert index)

_NP_DTYPES = {"F32": np.float32, "F16": np.float16}
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class ExpertLayout:
    """Names and shapes of one expert's parameters, in packing order; the same for every expert of a model."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, expert: nn.Module) -> ExpertLayout:
        """The layout of `expert`'s parameters, in `named_parameters` order."""
        params = list(expert.named_parameters())
        return cls(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params), params[0][1].dtype)

    @property
    def numel(self) -> int:
        """Elements in one packed expert."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        """Bytes of one packed expert: the size of a cache slot."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def pack(self, expert: nn.Module, out: torch.Tensor) -> None:
        """Copy `expert`'s parameters into the flat buffer `out` [numel], in layout order."""
        params = dict(expert.named_parameters())
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            out[offset : offset + n].copy_(params[name].detach().reshape(-1))
            offset += n

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter views into a packed buffer (a host buffer or a device slot)."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out


class ExpertStore:
    """Host-side source of expert weights; `host(key)` is what a cache slot copies from."""

    def __init__(self, layout: ExpertLayout, buffers: dict[ExpertKey, torch.Tensor], tier: str, pinned: bool):
        self.layout = layout
        self._buffers = buffers
        self.tier = tier
        self.pinned = pinned

    @property
    def keys(self) -> list[ExpertKey]:
        """Every stored (layer, expert), sorted."""
        return sorted(self._buffers)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (all are the same size)."""
        return self.layout.nbytes

    def host(self, key: ExpertKey) -> torch.Tensor:
        """The host buffer [numel] of one expert: what a slot copies from."""
        return self._buffers[key]

    @classmethod
    def from_experts(
        cls,
        experts: Iterator[tuple[ExpertKey, nn.Module]],
        tier: str = "ram",
        pin: bool = False,
        disk_path: Path | None = None,
    ) -> ExpertStore:
        """Copy the experts out of the model. With tier 'disk', `disk_path` is written once and reused."""
        experts = list(experts)
        if not experts:
            raise ValueError("no experts to store")
        layout = ExpertLayout.of(experts[0][1])
        if tier == "ram":
            buffers = {}
            for key, module in experts:
                buf = torch.empty(layout.numel, dtype=layout.dtype, pin_memory=pin)
                layout.pack(module, buf)
                buffers[key] = buf
            return cls(layout, buffers, "ram", pin)
        if tier == "disk":
            if disk_path is None:
                raise ValueError("tier 'disk' needs a path for the expert file")
            if not disk_path.is_file():
                _write_experts(disk_path, layout, experts)
            return cls(layout, _map_experts(disk_path, layout), "disk", False)
        raise ValueError(f"unknown expert tier {tier!r}; expected ram or disk")


def _name(key: ExpertKey) -> str:
    """The tensor name of an expert in the disk tier's file."""
    return f"layer{key[0]}.expert{key[1]}"


def _write_experts(path: Path, layout: ExpertLayout, experts: list[tuple[ExpertKey, nn.Module]]) -> None:
    """Pack every expert into one safetensors file at `path`, atomically."""
    tensors = {}
    for key, module in experts:
        buf = torch.empty(layout.numel, dtype=layout.dtype)
        layout.pack(module, buf)
        tensors[_name(key)] = buf
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"layout": json.dumps({"names": layout.names, "shapes": layout.shapes})})
    tmp.replace(path)  # a crash mid-write never leaves a half file under the real name


def _map_experts(path: Path, layout: ExpertLayout) -> dict[ExpertKey, torch.Tensor]:
    """Memory-map every tensor of a safetensors file without reading it (header parsed here, data left on disk)."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    mapped = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _NP_DTYPES or info["shape"] != [layout.numel]:
            raise ValueError(f"{path}: tensor {name} is {info['dtype']}{info['shape']}, expected a packed expert")
        begin, _end = info["data_offsets"]
        arr = np.memmap(path, dtype=_NP_DTYPES[info["dtype"]], mode="r", offset=base + begin, shape=(layout.numel,))
        layer, expert = name.removeprefix("layer").split(".expert")
        with warnings.catch_warnings():  # a read-only mapping: sida only ever copies from it
            warnings.simplefilter("ignore", UserWarning)
            mapped[(int(layer), int(expert))] = torch.from_numpy(arr)
    return mapped
