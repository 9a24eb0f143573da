"""One expert packed into a flat buffer, and where packed experts come from.

An expert's parameters are packed into one contiguous buffer so that a load is a single copy into a cache
slot. `ExpertLayout` says how; an `ExpertSource` yields packed experts: from the checkpoint on disk (so they
never pass through the model or the device) or from the modules of a model already loaded.

An expert is either a module of its own (Switch: `experts.expert_3`) or one index of a fused experts module
(transformers' experts interface: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, biases `[E, ...]`), seen
through `FusedExpert`; both have `named_parameters()`, which is all the packing reads.
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


class HasParameters(Protocol):
    """One expert's parameters: an `nn.Module`, or a `FusedExpert` view."""

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]: ...


class FusedExpert:
    """Expert `index` of a fused experts module: every parameter whose first dimension is the expert, indexed."""

    def __init__(self, module: nn.Module, index: int, names: tuple[str, ...]):
        self.module = module
        self.index = index
        self.names = names  # the module's per-expert parameters, e.g. ("gate_up_proj", "down_proj")

    @staticmethod
    def parameter_names(module: nn.Module, num_experts: int) -> tuple[str, ...]:
        """The module's own parameters with one row per expert (a shared sub-module, such as a norm, is dense)."""
        return tuple(n for n, p in module.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == num_experts)

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, getattr(self.module, n)[self.index]) for n in self.names]

    def parameters(self) -> list[torch.Tensor]:
        return [p for _, p in self.named_parameters()]


@dataclass(frozen=True)
class ExpertLayout:
    """Names and shapes of one expert's parameters, in packing order; the same for every expert of a model."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, expert: HasParameters) -> ExpertLayout:
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

    def pack(self, expert: HasParameters, out: torch.Tensor) -> None:
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

    def __init__(self, experts: Iterable[tuple[ExpertKey, HasParameters]]):
        self._modules = dict(experts)
        if not self._modules:
            raise ValueError("no experts to store")
        self.keys = sorted(self._modules)
        self.layout = ExpertLayout.of(self._modules[self.keys[0]])

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        self.layout.pack(self._modules[key], out)


@dataclass(frozen=True)
class Piece:
    """A run of elements of one checkpoint tensor: `numel` elements from element `start` of tensor `name`."""

    name: str
    start: int
    numel: int


class CheckpointExperts:
    """The experts of a checkpoint on disk, read range by range without loading the model's copy.

    Each expert parameter is a list of pieces, concatenated in order: one whole tensor (a per-expert checkpoint
    of a per-expert module), one expert's contiguous rows of a fused `[E, ...]` tensor, or the per-expert
    tensors that a fused parameter concatenates (gate rows, then up rows)."""

    def __init__(
        self, checkpoint: Checkpoint, layout: ExpertLayout, pieces: dict[ExpertKey, tuple[tuple[Piece, ...], ...]]
    ):
        self.checkpoint = checkpoint
        self.layout = layout
        self.keys = sorted(pieces)
        self._pieces = pieces  # key → per parameter, in layout order, the pieces that make it

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        offset = 0
        for parts, shape in zip(self._pieces[key], self.layout.shapes):
            end = offset + math.prod(shape)
            for piece in parts:
                self.checkpoint.read_range(piece.name, piece.start, out[offset : offset + piece.numel])
                offset += piece.numel
            if offset != end:
                raise ValueError(f"expert {key}: the checkpoint pieces do not make a parameter of shape {shape}")
