"""The host copy of every expert: one flat buffer per (layer, expert), in RAM or in a file on disk.

An expert's parameters are packed into one contiguous buffer so that a load is a single copy into a
cache slot. Experts come from an `ExpertSource`: the checkpoint on disk (so they never pass through the
model or the device) or the modules of a model already loaded. Tier `ram` packs them into one arena of a
few large buffers, pinned when CUDA is present (copies can then be asynchronous, and one allocation per
chunk avoids the pinned allocator rounding every expert up to a power of two); tier `disk` streams them
into one safetensors file per model, written once, and reads an expert from it when a slot needs it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from sida.offload.checkpoint import Checkpoint, CheckpointError, SafetensorsWriter, TensorInfo, read_header, read_into

ExpertKey = tuple[int, int]  # (MoE layer index, expert index)

ARENA_CHUNK_BYTES = 256 << 20  # the ram tier's arena is cut into buffers of about this size


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


class ExpertSource(Protocol):
    """Where the experts' weights come from when a store is built."""

    layout: ExpertLayout
    keys: list[ExpertKey]

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        """Fill the host buffer `out` [layout.numel] with expert `key`'s packed parameters."""
        ...


class ModuleExperts:
    """The experts of a model already loaded: packed from its modules."""

    def __init__(self, experts: Iterable[tuple[ExpertKey, nn.Module]]):
        self._modules = dict(experts)
        if not self._modules:
            raise ValueError("no experts to store")
        self.keys = sorted(self._modules)
        self.layout = ExpertLayout.of(self._modules[self.keys[0]])

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        self.layout.pack(self._modules[key], out)


class CheckpointExperts:
    """The experts of a checkpoint on disk, read tensor by tensor without loading the model's copy."""

    def __init__(self, checkpoint: Checkpoint, layout: ExpertLayout, names: dict[ExpertKey, tuple[str, ...]]):
        self.checkpoint = checkpoint
        self.layout = layout
        self.keys = sorted(names)
        self._names = names  # key → the checkpoint's tensor name of each parameter, in layout order

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        offset = 0
        for name, shape in zip(self._names[key], self.layout.shapes):
            n = math.prod(shape)
            self.checkpoint.read_flat(name, out[offset : offset + n])
            offset += n


class ExpertStore:
    """Host-side source of expert weights; `host(key)` is what a cache slot copies from."""

    tier: str

    def __init__(self, layout: ExpertLayout, keys: list[ExpertKey]):
        self.layout = layout
        self.keys = keys

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (all are the same size)."""
        return self.layout.nbytes

    @property
    def pinned(self) -> bool:
        return self.pinned_bytes > 0

    @property
    def pinned_bytes(self) -> int:
        """Host bytes held as page-locked memory (as the pinned allocator reserves them)."""
        return 0

    @property
    def host_bytes(self) -> int:
        """Host bytes the store keeps allocated for expert weights (buffers, not the file on disk)."""
        return 0

    def host(self, key: ExpertKey) -> torch.Tensor:
        """The host buffer [numel] of one expert: what a slot copies from (valid until the next call)."""
        raise NotImplementedError

    @classmethod
    def build(
        cls, source: ExpertSource, tier: str = "ram", pin: bool = False, disk_path: Path | None = None
    ) -> ExpertStore:
        """Every expert of `source` in the host tier. With tier 'disk', `disk_path` is written once and reused."""
        if tier == "ram":
            return RamExperts(source, pin)
        if tier == "disk":
            if disk_path is None:
                raise ValueError("tier 'disk' needs a path for the expert file")
            if not disk_path.is_file():
                try:
                    write_expert_file(disk_path, source)
                except OSError as e:
                    raise CheckpointError(
                        f"cannot write the expert file {disk_path}: {e.strerror or e} "
                        "(set expert_dir to a writable folder)"
                    ) from None
            return DiskExperts(disk_path, source.layout, source.keys)
        raise ValueError(f"unknown expert tier {tier!r}; expected ram or disk")

    @classmethod
    def from_experts(
        cls,
        experts: Iterable[tuple[ExpertKey, nn.Module]],
        tier: str = "ram",
        pin: bool = False,
        disk_path: Path | None = None,
    ) -> ExpertStore:
        """A store of the experts of modules already loaded."""
        return cls.build(ModuleExperts(experts), tier, pin, disk_path)


class RamExperts(ExpertStore):
    """Every expert in host RAM: an arena of chunks of whole experts, each chunk one allocation."""

    tier = "ram"

    def __init__(self, source: ExpertSource, pin: bool):
        super().__init__(source.layout, source.keys)
        layout = source.layout
        per_chunk = max(1, ARENA_CHUNK_BYTES // layout.nbytes)
        self._chunks: list[torch.Tensor] = []
        self._buffers: dict[ExpertKey, torch.Tensor] = {}
        for first in range(0, len(self.keys), per_chunk):
            keys = self.keys[first : first + per_chunk]
            chunk = torch.empty(len(keys), layout.numel, dtype=layout.dtype, pin_memory=pin)
            self._chunks.append(chunk)
            for row, key in enumerate(keys):
                source.read_into(key, chunk[row])
                self._buffers[key] = chunk[row]
        self._pin = pin

    @property
    def pinned_bytes(self) -> int:
        # the pinned allocator reserves a power of two per allocation
        return sum(1 << (c.numel() * c.element_size() - 1).bit_length() for c in self._chunks) if self._pin else 0

    @property
    def host_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._chunks)

    def host(self, key: ExpertKey) -> torch.Tensor:
        return self._buffers[key]


class DiskExperts(ExpertStore):
    """Every expert in one safetensors file; `host(key)` reads one into a staging buffer, so the host holds one
    expert however many the file has."""

    tier = "disk"

    def __init__(self, path: Path, layout: ExpertLayout, keys: list[ExpertKey]):
        super().__init__(layout, keys)
        self.path = path
        try:
            tensors, _meta = read_header(path)
        except CheckpointError as e:
            raise CheckpointError(f"expert file {e} (delete it to rewrite it)") from None
        self._info: dict[ExpertKey, TensorInfo] = {}
        for key in keys:
            info = tensors.get(_name(key))
            if info is None or info.dtype != layout.dtype or info.shape != (layout.numel,):
                raise CheckpointError(
                    f"{path} does not hold expert {key} as {layout.dtype} [{layout.numel}] (delete it to rewrite it)"
                )
            self._info[key] = info
        self._staging = torch.empty(layout.numel, dtype=layout.dtype)

    @property
    def host_bytes(self) -> int:
        return self._staging.numel() * self._staging.element_size()

    def host(self, key: ExpertKey) -> torch.Tensor:
        read_into(self._info[key], self._staging)
        return self._staging


def _name(key: ExpertKey) -> str:
    """The tensor name of an expert in the disk tier's file."""
    return f"layer{key[0]}.expert{key[1]}"


def write_expert_file(path: Path, source: ExpertSource) -> None:
    """Pack every expert of `source` into one safetensors file at `path`, one expert in memory at a time."""
    layout = source.layout
    if layout.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"tier 'disk' stores floating-point experts, not {layout.dtype}")
    entries = [(_name(key), layout.dtype, (layout.numel,)) for key in source.keys]
    meta = {"layout": json.dumps({"names": layout.names, "shapes": layout.shapes})}
    writer = SafetensorsWriter(path, entries, meta)
    buf = torch.empty(layout.numel, dtype=layout.dtype)
    try:
        for key in source.keys:
            source.read_into(key, buf)
            writer.write(_name(key), buf)
        writer.close()
    except BaseException:
        writer.abort()
        raise
