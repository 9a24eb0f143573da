"""One expert packed into a flat buffer, and where packed experts come from.

An expert's parameters are packed into one contiguous buffer so that a load is a single copy into a cache
slot. `ExpertLayout` says how; an `ExpertSource` yields packed experts: from the checkpoint on disk (so they
never pass through the model or the device) or from the modules of a model already loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from sida.offload.checkpoint import Checkpoint

ExpertKey = tuple[int, int]  # (MoE layer index, expert index)


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
