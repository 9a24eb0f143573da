"""A decode step's experts, predicted a layer ahead: no hash table covers a token that did not exist when its batch
was hashed, so while one MoE layer computes, the next MoE layer's own router is applied to the hidden state entering
this layer's experts (the residual stream changes little from one layer to the next), and its top-k experts start
loading (the executor's `next_keys`, `moe_layer.NextLayerExperts`). The first MoE layer's router is applied to the
embedding of the token the step reads, before the step's forward. This is mixtral-offloading's gate-ahead
prefetch; the router still routes every token, so a wrong guess costs a load, never a wrong answer.

Each guess is scored when its layer runs: decode-step recall, the share of the router's k choices that were among
the k guessed (`RoutingStats.decode_hits` / `decode_lookups`, per layer).
"""

from __future__ import annotations

import torch
from torch import nn

from sida.offload.expert_layout import ExpertKey


def router_projection(router: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [experts, H], bias [experts] or None) of a decoder-only family's router: its logits are
    `hidden @ weight.T + bias` before any family-specific scoring (softmax, sigmoid, group limits), which keeps the
    ranking the top-k reads closely enough for a prefetch guess."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(router).__name__} has no [experts, hidden] weight to apply ahead")
    bias = getattr(router, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


class RouterAhead:
    """Guesses each MoE layer's experts for the current decode step from the layer before it (see the module)."""

    def __init__(self, routers: dict[int, nn.Module], following: dict[int, int], embeddings: nn.Module, k: int):
        self.projections = {layer: router_projection(r) for layer, r in routers.items()}
        self.following = following  # MoE layer → the MoE layer after it within the step
        self.first = min(routers)
        self.embeddings = embeddings
        self.k = k
        self.guesses: dict[int, torch.Tensor] = {}  # layer → experts [tokens, k] guessed for this step

    def begin_step(self, input_ids: torch.Tensor) -> list[ExpertKey]:
        """A decode step reads `input_ids` [rows, 1]: forget the last step's guesses and guess the first MoE layer's
        experts from the tokens' embeddings; returns the keys to load now."""
        with torch.inference_mode():
            hidden = self.embeddings(input_ids).reshape(-1, self.embeddings.embedding_dim)  # [rows, H]
        self.guesses = {self.first: self._top_k(self.first, hidden)}
        return self.keys(self.first)

    def observe(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, stats) -> None:
        """`layer` runs its experts on `hidden` [tokens, H] with the router's choice `top_k_index` [tokens, k]: score
        its guess, and guess the next MoE layer's experts from the same hidden state."""
        guess = self.guesses.pop(layer, None)
        if guess is not None and guess.shape[0] == top_k_index.shape[0]:
            stats.count_decode(layer, top_k_index, guess)
        nxt = self.following.get(layer)
        if nxt is not None:
            self.guesses[nxt] = self._top_k(nxt, hidden)

    def keys(self, layer: int) -> list[ExpertKey]:
        """The distinct experts guessed for `layer` in this step."""
        guess = self.guesses.get(layer)
        return [] if guess is None else [(layer, e) for e in sorted(set(guess.reshape(-1).tolist()))]

    def _top_k(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self.projections[layer]
        logits = nn.functional.linear(hidden.to(weight.dtype), weight, bias)  # [tokens, experts]
        return logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices
