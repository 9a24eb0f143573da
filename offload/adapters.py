"""Model adapters: where a model family keeps its embeddings, MoE blocks, routers and experts, and how sida's
expert execution is put in its place.

Two adapters: `SwitchAdapter` (encoder-decoder Switch Transformers: each sparse MLP is replaced by a SiDA layer)
and `ExpertsAdapter` (any causal LM whose routed experts use transformers' experts interface: sida becomes the
experts implementation, experts_interface.py). Everything else in sida reaches into the model only through an
adapter, so that a change in the Hugging Face internals breaks here (and in tests/offload/test_adapters.py and
tests/offload/test_families.py), not everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from sida.offload.expert_execution import ExpertExecutor
from sida.offload.expert_layout import FusedExpert, HasParameters
from sida.offload.experts_interface import ExpertsRoute, fused_expert_forward, install, uses_experts_interface
from sida.offload.moe_layer import RoutingContext, SiDAMoELayer


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
    experts: tuple[HasParameters, ...]  # one per expert: its module, or a view of a fused experts module


class MoEAdapter(Protocol):
    """What sida needs to know about a model family; one implementation per family."""

    family: str
    is_encoder_decoder: bool

    def embeddings(self, model: nn.Module) -> nn.Embedding:
        """The input token embeddings [vocab, d_model]."""
        ...

    def moe_layers(self, model: nn.Module) -> list[SparseBlock]:
        """Every MoE layer, encoder first, indexed 0..L-1."""
        ...

    def num_experts(self, model: nn.Module) -> int:
        """Experts per MoE layer."""
        ...

    def expert_forward(self, model: nn.Module):
        """f(params, x [tokens, d_model]) → [tokens, d_model]: one expert computed from its parameter views."""
        ...

    def attach(
        self, model: nn.Module, layers: list[SparseBlock], executor: ExpertExecutor, context: RoutingContext, stats
    ) -> None:
        """Make every MoE layer of `layers` route its tokens and run its experts through `executor`; the experts'
        own weights leave the model."""
        ...

    def decoder_start_ids(self, model: nn.Module, rows: int, device=None) -> torch.Tensor | None:
        """[rows, 1] the decoder's first input (None for a decoder-only model)."""
        ...


class SwitchAdapter:
    """`SwitchTransformersForConditionalGeneration` (transformers 5.x)."""

    family = "switch_transformers"
    is_encoder_decoder = True

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

    def attach(
        self, model: nn.Module, layers: list[SparseBlock], executor: ExpertExecutor, context: RoutingContext, stats
    ) -> None:
        """Each sparse MLP becomes a `SiDAMoELayer` with the same router (top-1, capacity, α kept)."""
        device = model.get_input_embeddings().weight.device
        experts, capacity = self.num_experts(model), self.expert_capacity(model)
        for la in layers:
            module = SiDAMoELayer(la.index, la.stack, la.mlp.router, executor, context, stats, experts, capacity)
            parent_name, _, child = la.name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.to(device))

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


class ExpertsAdapter:
    """A causal LM whose routed experts are modules of transformers' experts interface (Mixtral, Qwen2/3-MoE, OLMoE,
    GPT-OSS, DeepSeek-V2/V3, Granite-MoE, and any other family built the same way). The MoE layers are found by
    that property, not by family name; dense layers (DeepSeek's first ones, Qwen's `mlp_only_layers`) and shared
    experts have no such module and stay dense weights."""

    is_encoder_decoder = False

    def __init__(self, family: str):
        self.family = family

    def embeddings(self, model: nn.Module) -> nn.Embedding:
        return model.get_input_embeddings()

    def _experts_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = [(n, m) for n, m in model.named_modules() if uses_experts_interface(m)]
        if not found:
            raise ValueError(
                f"unsupported model_type {self.family!r}: it has no MoE layers with transformers' experts interface"
            )
        return found

    def num_experts(self, model: nn.Module) -> int:
        """The experts module's `num_experts`: the same for every MoE layer."""
        return int(self._experts_modules(model)[0][1].num_experts)

    def expert_forward(self, model: nn.Module):
        """One expert as the experts module's class computes it (experts_interface.fused_expert_forward)."""
        return fused_expert_forward(self._experts_modules(model)[0][1])

    def decoder_start_ids(self, model: nn.Module, rows: int, device=None) -> None:
        return None

    def moe_layers(self, model: nn.Module) -> list[SparseBlock]:
        """Every experts module in model order, its parent block (router + experts + any shared expert) as `mlp`."""
        layers = []
        for name, experts in self._experts_modules(model):
            parent_name = name.rpartition(".")[0]
            mlp = model.get_submodule(parent_name)
            router = mlp.gate if hasattr(mlp, "gate") else getattr(mlp, "router", None)
            names = FusedExpert.parameter_names(experts, int(experts.num_experts))
            views = tuple(FusedExpert(experts, e, names) for e in range(int(experts.num_experts)))
            block = next((int(p) for p in reversed(parent_name.split(".")) if p.isdigit()), len(layers))
            layers.append(SparseBlock(len(layers), name, "decoder", block, mlp, router, views))
        return layers

    def attach(
        self, model: nn.Module, layers: list[SparseBlock], executor: ExpertExecutor, context: RoutingContext, stats
    ) -> None:
        """sida becomes the model's experts implementation; each experts module gets its `ExpertsRoute`."""
        routes = [(la.experts[0], ExpertsRoute(la.index, executor, context, stats)) for la in layers]
        install(model, [(view.module, route, view.names) for view, route in routes])


def adapter_for(model_type: str) -> MoEAdapter:
    """The adapter of a config's `model_type`; a clear error for an unsupported family. Whether a causal LM has MoE
    layers sida can offload is known once its modules exist (`moe_layers`)."""
    if model_type == SwitchAdapter.family:
        return SwitchAdapter()
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return ExpertsAdapter(model_type)
    raise ValueError(
        f"unsupported model_type {model_type!r}: sida serves switch_transformers and causal LMs whose experts use "
        "transformers' experts interface"
    )


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


def router_logits(outputs, num_experts: int) -> torch.Tensor:
    """The router logits [..., num_experts] among a router module's outputs: its first floating tensor with one
    column per expert (Switch returns (one-hot, probability, logits); the experts-interface routers return logits
    first, or after the indices in some transformers versions)."""
    for out in outputs if isinstance(outputs, tuple) else (outputs,):
        if torch.is_tensor(out) and out.is_floating_point() and out.shape[-1] == num_experts:
            return out
    raise ValueError(f"the router returned no logits with {num_experts} columns")


@contextmanager
def capture_routing(layers: list[SparseBlock]) -> Iterator[RoutingCapture]:
    """Record every router call of `layers` while the block runs (one record per forward call; decoding appends
    one per step), shaped as the MoE block's input: [batch, seq, experts]. Routers see the tokens flattened in some
    families and releases; the block's input says the batch's shape."""
    capture = RoutingCapture({layer.index: [] for layer in layers})
    shapes: dict[int, torch.Size] = {}  # layer → the leading shape of its MoE block's latest input
    handles = []
    for layer in layers:
        experts = len(layer.experts)

        def keep_shape(_module, inputs, index=layer.index):
            shapes[index] = inputs[0].shape[:-1]

        def hook(_module, _inputs, outputs, index=layer.index, experts=experts):
            logits = router_logits(outputs, experts).detach().float()
            if index in shapes and logits.shape[:-1].numel() == shapes[index].numel():
                logits = logits.reshape(*shapes[index], experts)
            probs = logits.softmax(-1)
            top_prob, expert = probs.max(-1)
            capture.records[index].append(RoutingRecord(expert, top_prob, logits))

        handles.append(layer.mlp.register_forward_pre_hook(keep_shape))
        # Switch's logits come from its router's classifier: the router's own outputs differ between releases
        handles.append(getattr(layer.router, "classifier", layer.router).register_forward_hook(hook))
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()
