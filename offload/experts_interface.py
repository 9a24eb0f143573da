"""sida as an implementation of transformers' experts interface: the decoder-only families (Mixtral, Qwen-MoE, OLMoE,
GPT-OSS, DeepSeek, Granite-MoE, ...) keep their routed experts in a module decorated with
`@use_experts_implementation`, whose forward dispatches on `config._experts_implementation` through
`ExpertsInterface`. sida registers its function there under `IMPLEMENTATION` and selects it with the model's own
`set_experts_implementation`, so the family's router, shared experts, dense layers and residuals run as Hugging Face
wrote them, and only the experts call `(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]` comes
here: an `ExpertsRoute` (routing by the hash table in `predicted` mode, hit counting), then the engine's
`ExpertExecutor`, which runs each expert from its cache slot.

One expert's computation is read from the experts module's own flags (`has_gate`, `has_bias`, `is_transposed`,
`has_post_expert_norm` where the installed transformers has it) and its own `_apply_gate` and `act_fn`, the same
pieces the eager forward uses in the same order; so any family that uses the interface with these flags runs
unchanged, with no list of family names here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface

from sida.offload.expert_execution import ExpertExecutor, ExpertForward
from sida.offload.moe_layer import RoutingContext, RoutingStats

IMPLEMENTATION = "sida"


def uses_experts_interface(module: nn.Module) -> bool:
    """Whether `module` is an experts module of transformers' interface: `use_experts_implementation` sets these
    flags on every instance."""
    return all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed")) and hasattr(
        module, "num_experts"
    )


def fused_expert_forward(module: nn.Module) -> ExpertForward:
    """f(params, x [n, H]) → [n, H]: one expert of `module`'s class from its parameter views (`gate_up_proj` or
    `up_proj`, `down_proj`, their biases), computed as the eager experts forward computes it."""
    transposed, gated = bool(module.is_transposed), bool(module.has_gate)
    up_name = "gate_up_proj" if gated else "up_proj"
    post_norm = module.post_expert_norm if getattr(module, "has_post_expert_norm", False) else None

    def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = x @ weight if transposed else nn.functional.linear(x, weight)  # weight [in, out] or [out, in]
        return y if bias is None else y + bias

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = project(x, params[up_name], params.get(f"{up_name}_bias"))  # [n, 2I] or [n, I]
        h = module._apply_gate(h) if gated else module.act_fn(h)  # [n, I]
        y = project(h, params["down_proj"], params.get("down_proj_bias"))  # [n, H]
        return y if post_norm is None else post_norm(y)

    return forward


class ExpertsRoute:
    """One MoE layer's experts call under sida. `exact`: the router's choice, padding tokens sent to no expert. In
    `predicted` mode, positions the hash table covers are routed by it: its top-k experts, weighted by its
    probabilities rescaled to the router's total weight for the token (so a family's normalisation, e.g.
    renormalised top-k or DeepSeek's scaling factor, is kept). Where the table has rows, the router's choice (its
    highest-weight expert) is scored against them. In a decode step (one new token per row), the context's
    `lookahead` scores this layer's guess and guesses the next layer's experts from `hidden` (lookahead.py)."""

    def __init__(self, layer: int, executor: ExpertExecutor, context: RoutingContext, stats: RoutingStats):
        self.layer = layer
        self.executor = executor
        self.context = context
        self.stats = stats

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] (T = batch × seq, row-major), top_k_index and top_k_weights [T, k] → [T, H]."""
        ctx = self.context
        mask = ctx.token_mask
        one_per_row = mask is not None and hidden.shape[0] == mask.shape[0]
        decode_step = ctx.decoding or (one_per_row and ctx.offsets[self.layer] > 0)
        if ctx.lookahead is not None and decode_step:  # one new token per row: guess the next layer's experts
            scored = ctx.lookahead.observe(self.layer, hidden, top_k_index, self.stats)
            if scored is not None:
                ctx.observe(("ahead", self.layer), scored, None, top_k_index)
        if mask is None or hidden.shape[0] % mask.shape[0]:
            return self.executor(hidden, top_k_index, top_k_weights, self.layer)
        rows = mask.shape[0]
        seq = hidden.shape[0] // rows
        start = ctx.offsets[self.layer]
        ctx.offsets[self.layer] += seq
        real = mask.bool().reshape(-1) if start == 0 and mask.shape[1] == seq else None  # [T] the prompt's tokens
        table = ctx.hash_table
        predicted = table.positions(self.layer, start, seq) if table is not None else None
        if predicted is not None:
            choice = top_k_index.gather(1, top_k_weights.argmax(1, keepdim=True))  # [T, 1] highest-weight expert
            ranked = predicted[0].reshape(hidden.shape[0], -1)  # [T, K]
            self.stats.count(self.layer, choice, ranked[:, None, :], None if real is None else real[:, None])
            probs = table.probabilities(self.layer, start, seq)
            keep = slice(None) if real is None else real
            probs = None if probs is None else probs.reshape(ranked.shape[0], -1)[keep]
            ctx.observe(("table", self.layer), ranked[keep], probs, top_k_index[keep])  # any router choice: needed
            if ctx.mode == "predicted":
                top_k_index, top_k_weights = self._from_table(table, start, seq, ranked, top_k_weights)
        elif ctx.mode == "predicted":
            self.stats.router_fallbacks += 1
        if real is not None:
            top_k_index = top_k_index.masked_fill(~real[:, None], -1)  # padding: no expert, nothing loaded
        return self.executor(hidden, top_k_index, top_k_weights, self.layer)

    def _from_table(
        self, table, start: int, seq: int, ranked: torch.Tensor, router_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k_index, top_k_weights) [T, k] from the table's top-k and their probabilities."""
        k = router_weights.shape[1]
        probs = table.probabilities(self.layer, start, seq)
        if probs is None:
            raise ValueError("predicted mode on a top-k family needs a hash table with per-rank probabilities")
        p = probs.reshape(ranked.shape[0], -1)[:, :k].float()  # [T, k]
        scale = router_weights.float().sum(-1, keepdim=True) / p.sum(-1, keepdim=True).clamp_min(1e-9)
        return ranked[:, :k], (p * scale).to(router_weights.dtype)


def sida_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The function registered in `ExpertsInterface`: the experts module's own `ExpertsRoute`."""
    route = self.__dict__.get("sida_route")
    if route is None:
        raise RuntimeError(
            f"{type(self).__name__} runs experts_implementation {IMPLEMENTATION!r} without a sida route: "
            "offload the model with sida's OffloadEngine"
        )
    return route(hidden_states, top_k_index, top_k_weights)


def install(model: nn.Module, routes: list[tuple[nn.Module, ExpertsRoute, tuple[str, ...]]]) -> None:
    """Route each experts module's calls to its `ExpertsRoute` and drop its per-expert parameters (the slots hold
    them now), then select the implementation for the whole model."""
    ExpertsInterface.register(IMPLEMENTATION, sida_experts_forward)
    for experts, route, names in routes:
        experts.sida_route = route
        for name in names:
            delattr(experts, name)
    model.set_experts_implementation(IMPLEMENTATION)
