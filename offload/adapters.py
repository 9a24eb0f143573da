"""Model adapters: where a model family keeps its embeddings, MoE blocks, routers and experts.

Everything else in sida reaches into the model only through an adapter, so that a change in the
Hugging Face internals breaks here (and in tests/offload/test_adapters.py), not everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers.activations import ACT2FN


@dataclass(frozen=True)
class SparseBlock:
    """One of the model's own MoE layers (the sparse MLP a `SiDAMoELayer` replaces): where it sits, its router and
    experts."""

    index: int  # 0..L-1 over the whole model, encoder layers first
    name: str  # module path of the sparse MLP, e.g. "encoder.block.1.layer.1.mlp"
    stack: str  # "encoder" | "decoder"
    block: int  # transformer block index inside its stack
    mlp: nn.Module  # the sparse MLP: router + experts
    router: nn.Module
    experts: tuple[nn.Module, ...]


class MoEAdapter(Protocol):
    """What sida needs to know about a model family; one implementation per family."""

    family: str

    def embeddings(self, model: nn.Module) -> nn.Embedding:
        """The input token embeddings [vocab, d_model]."""
        ...

    def moe_layers(self, model: nn.Module) -> list[SparseBlock]:
        """Every MoE layer, encoder first, indexed 0..L-1."""
        ...

    def num_experts(self, model: nn.Module) -> int:
        """Experts per MoE layer."""
        ...

    def expert_capacity(self, model: nn.Module) -> int:
        """The router's tokens-per-expert limit."""
        ...

    def expert_forward(self, model: nn.Module):
        """f(params, x [tokens, d_model]) → [tokens, d_model]: one expert computed from its parameter views."""
        ...

    def replace_moe(self, model: nn.Module, layer: SparseBlock, module: nn.Module) -> None:
        """Put `module` in the model where `layer`'s sparse MLP was."""
        ...

    def decoder_start_ids(self, model: nn.Module, rows: int, device=None) -> torch.Tensor:
        """[rows, 1] the decoder's first input."""
        ...


class SwitchAdapter:
    """`SwitchTransformersForConditionalGeneration` (transformers 5.x)."""

    family = "switch_transformers"

    def embeddings(self, model: nn.Module) -> nn.Embedding:
        """The shared input embeddings [vocab, d_model]."""
        return model.get_input_embeddings()

    def num_experts(self, model: nn.Module) -> int:
        """`config.num_experts`: the same for every MoE layer."""
        return int(model.config.num_experts)

    def expert_capacity(self, model: nn.Module) -> int:
        """`config.expert_capacity`: the router's tokens-per-expert limit."""
        return int(model.config.expert_capacity)

    def expert_forward(self, model: nn.Module):
        """f(params, x [tokens, d_model]) → [tokens, d_model]: one expert from views of its packed weights, as
        SwitchTransformersDenseActDense computes it."""
        act = ACT2FN[model.config.dense_act_fn]

        def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            h = act(nn.functional.linear(x, params["wi.weight"]))  # [tokens, d_ff]
            return nn.functional.linear(h.to(params["wo.weight"].dtype), params["wo.weight"])  # [tokens, d_model]

        return forward

    def decoder_start_ids(self, model: nn.Module, rows: int, device=None) -> torch.Tensor:
        """[rows, 1] the decoder's first input: the config's decoder start token."""
        return torch.full((rows, 1), int(model.config.decoder_start_token_id), dtype=torch.long, device=device)

    def replace_moe(self, model: nn.Module, layer: SparseBlock, module: nn.Module) -> None:
        """Set `module` as the sparse MLP at `layer.name`."""
        parent_name, _, child = layer.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)

    def moe_layers(self, model: nn.Module) -> list[SparseBlock]:
        """The sparse blocks' MLPs, encoder then decoder; an error if the model has none."""
        layers = []
        for stack_name in ("encoder", "decoder"):
            stack = getattr(model, stack_name)
            for b, block in enumerate(stack.block):
                ff = block.layer[-1]  # the feed-forward sub-layer is last in a Switch block
                if not getattr(ff, "is_sparse", False):
                    continue
                mlp = ff.mlp
                experts = tuple(mlp.experts[f"expert_{i}"] for i in range(self.num_experts(model)))
                name = f"{stack_name}.block.{b}.layer.{len(block.layer) - 1}.mlp"
                layers.append(SparseBlock(len(layers), name, stack_name, b, mlp, mlp.router, experts))
        if not layers:
            raise ValueError("this Switch model has no sparse (MoE) blocks")
        return layers


ADAPTERS: dict[str, type] = {"switch_transformers": SwitchAdapter}


def adapter_for(model_type: str) -> MoEAdapter:
    """The adapter of a config's `model_type`; a clear error for an unsupported family."""
    try:
        return ADAPTERS[model_type]()
    except KeyError:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(ADAPTERS)}") from None


@dataclass
class RoutingRecord:
    """Router decisions of one forward call of one MoE layer."""

    expert: torch.Tensor  # [batch, seq] argmax of the router (before any capacity drop)
    top_prob: torch.Tensor  # [batch, seq] the router's probability of that expert
    logits: torch.Tensor  # [batch, seq, experts] raw router logits, fp32


@dataclass
class RoutingCapture:
    """Router records of the MoE layers observed by `capture_routing`."""

    records: dict[int, list[RoutingRecord]] = field(default_factory=dict)  # MoE layer index → calls in order


@contextmanager
def capture_routing(layers: list[SparseBlock]) -> Iterator[RoutingCapture]:
    """Record every router call of `layers` while the block runs (one record per forward call; decoding appends
    one per step)."""
    capture = RoutingCapture({layer.index: [] for layer in layers})
    handles = []
    for layer in layers:

        def hook(_module, _inputs, outputs, index=layer.index):
            logits = outputs[2].detach().float()
            probs = logits.softmax(-1)
            top_prob, expert = probs.max(-1)
            capture.records[index].append(RoutingRecord(expert, top_prob, logits))

        handles.append(layer.router.register_forward_hook(hook))
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()
