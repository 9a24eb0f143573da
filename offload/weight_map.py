"""Which checkpoint tensors make each of a model's weights: a dense weight is one tensor read whole; an expert's
parameter is a list of byte ranges (`Piece`s) of checkpoint tensors, read straight into the host store.

Checkpoint names are mapped to the model's with transformers' own conversion mapping (`get_model_conversion_mapping`
and `rename_source_key`: what `from_pretrained` applies, and what PEFT uses), so renamed modules (Mixtral's
`block_sparse_moe` → `mlp`) and per-expert checkpoints of fused experts (`experts.N.w1 / w3` → `gate_up_proj`) are
read as the library reads them. Only the conversions that are byte ranges are streamed:
- a tensor renamed as it is: a per-expert module's parameter whole, or one expert's rows of a fused `[E, ...]`
  tensor (its first dimension: one contiguous range);
- per-expert tensors stacked on the expert dimension (`MergeModulelist(dim=0)`), then optionally concatenated on the
  first dimension of an expert (`Concatenate(dim=1)`: the gate rows, then the up rows): an expert's parameter is its
  tensors one after the other, in the converter's source order.
Any other conversion of an expert tensor is refused with its name (convert such a checkpoint offline first).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, rename_source_key

from sida.offload.checkpoint import Checkpoint
from sida.offload.expert_layout import ExpertKey, ExpertLayout, FusedExpert, Piece


class WeightMapError(ValueError):
    """The checkpoint does not hold the model's weights in a form sida can read range by range."""


@dataclass
class WeightMap:
    """The checkpoint names of a model's dense weights, and the pieces of each expert's parameters."""

    dense: dict[str, str]  # model key → checkpoint tensor
    experts: dict[ExpertKey, tuple[tuple[Piece, ...], ...]]  # key → per layout parameter, its pieces in order
    expert_params: frozenset[str]  # the model keys that hold experts (left on meta: the store holds them)


@dataclass(frozen=True)
class _Slot:
    """Where one expert parameter sits in the model: its expert, its position in the layout, its row in a fused
    tensor (None for a per-expert module's own parameter)."""

    key: ExpertKey
    position: int
    row: int | None


def map_weights(model: nn.Module, experts: dict[ExpertKey, object], layout: ExpertLayout, checkpoint: Checkpoint):
    """The WeightMap of `model` (built on the meta device) from `checkpoint`; `experts` maps each expert key to its
    module or `FusedExpert` view. Checkpoint tensors the model has no place for are left out."""
    targets = _expert_targets(model, experts, layout)
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    state = model.state_dict()
    dense: dict[str, str] = {}
    parts: dict[tuple[ExpertKey, int], list[tuple[int, Piece]]] = {}
    for name, info in checkpoint.tensors.items():
        target, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        if target not in targets:
            if target in state:
                dense[target] = name
            continue
        slots = targets[target]
        per = math.prod(layout.shapes[slots[0].position])  # elements of one expert's parameter
        if pattern is None:  # the same tensor under its name: whole, or one row per expert
            if info.numel != per * (1 if slots[0].row is None else len(slots)):
                raise WeightMapError(f"checkpoint tensor {name} {info.shape} does not have the shape of {target}")
            for slot in slots:
                start = 0 if slot.row is None else slot.row * per
                parts.setdefault((slot.key, slot.position), []).append((0, Piece(name, start, per)))
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        _check_streamable(converter, name)
        row = _expert_index(name, pattern)
        slot = next((s for s in slots if s.row == row), None)
        if slot is None:
            raise WeightMapError(f"checkpoint tensor {name}: expert {row} is not an expert of {target}")
        order = converter.source_patterns.index(pattern)
        parts.setdefault((slot.key, slot.position), []).append((order, Piece(name, 0, info.numel)))
    return WeightMap(dense, _assemble(parts, experts, layout), frozenset(targets))


def _expert_targets(model: nn.Module, experts: dict[ExpertKey, object], layout: ExpertLayout) -> dict[str, list[_Slot]]:
    """Model key of each expert parameter (e.g. `model.layers.1.mlp.experts.gate_up_proj`) → the experts it holds."""
    names = {id(m): n for n, m in model.named_modules()}
    targets: dict[str, list[_Slot]] = {}
    for key, expert in experts.items():
        module, row = (expert.module, expert.index) if isinstance(expert, FusedExpert) else (expert, None)
        for position, param in enumerate(layout.names):
            targets.setdefault(f"{names[id(module)]}.{param}", []).append(_Slot(key, position, row))
    return targets


def _check_streamable(converter: WeightConverter, name: str) -> None:
    """Only stacking on the expert dimension, then concatenating on an expert's first dimension, are byte ranges."""
    ops = list(converter.operations)
    stacked = len(ops) >= 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
    concatenated = len(ops) == 1 or (len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1)
    if not (stacked and concatenated):
        done = ", ".join(type(op).__name__ for op in ops)
        raise WeightMapError(f"checkpoint tensor {name} is converted by [{done}], which sida cannot read by ranges")


def _expert_index(name: str, pattern: str) -> int:
    """The expert number of a per-expert checkpoint tensor: what the converter pattern's `*` matches."""
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    found = re.search(regex, name) or re.search(r"experts\.(\d+)\.", name)
    if found is None:
        raise WeightMapError(f"checkpoint tensor {name}: no expert number where {pattern!r} expects one")
    return int(found.group(1))


def _assemble(parts, experts, layout: ExpertLayout) -> dict[ExpertKey, tuple[tuple[Piece, ...], ...]]:
    """Each expert's pieces in layout order; an error naming the first parameter the checkpoint does not complete."""
    out = {}
    for key in sorted(experts):
        params = []
        for position, (param, shape) in enumerate(zip(layout.names, layout.shapes)):
            pieces = tuple(p for _, p in sorted(parts.get((key, position), []), key=lambda x: x[0]))
            if sum(p.numel for p in pieces) != math.prod(shape):
                raise WeightMapError(f"weights missing for expert {key[1]} of MoE layer {key[0]}: {param} {shape}")
            params.append(pieces)
        out[key] = tuple(params)
    return out
