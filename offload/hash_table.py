"""The hash table: for every MoE layer and token of a batch, the predicted experts (best first) and α.

The predictor worker builds it ahead of inference; the routing context turns it into each expert's chance of use
by the batch, to prefetch and evict by (`exact` and `predicted` modes), and the MoE layer routes by it (`predicted`
mode). `from_router_logits` builds a perfect one from the router itself (the oracle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

HIT_RANKS = 3  # tables rank at least this deep, so that top-1..3 hit rates can be counted


def rank_depth(prefetch_k: int) -> int:
    """How many experts per token a hash table ranks: enough for prefetch and for the top-1..3 hit counts."""
    return max(HIT_RANKS, prefetch_k)


@dataclass
class HashTable:
    """Per MoE layer, each position's predicted experts ranked best first, and the top-1 expert's α."""

    experts: dict[int, torch.Tensor]  # MoE layer → [batch, seq, k] expert ids, best first
    alphas: dict[int, torch.Tensor]  # MoE layer → [batch, seq] scaling factor of the top-1 expert
    # MoE layer → [batch, seq, k] the predicted probability of each ranked expert (routes top-k families)
    probs: dict[int, torch.Tensor] = field(default_factory=dict)

    def positions(self, layer: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(experts [batch, length, k], α [batch, length]) of positions [start, start+length) of a layer, or None
        if the table does not cover them."""
        experts = self.experts.get(layer)
        if experts is None or start + length > experts.shape[1]:
            return None
        return experts[:, start : start + length], self.alphas[layer][:, start : start + length]

    def probabilities(self, layer: int, start: int, length: int) -> torch.Tensor | None:
        """[batch, length, k] the ranked experts' probabilities at positions [start, start+length), if the table
        has them."""
        probs = self.probs.get(layer)
        if probs is None or start + length > probs.shape[1]:
            return None
        return probs[:, start : start + length]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the table (to mark them used by another CUDA stream)."""
        return [*self.experts.values(), *self.alphas.values(), *self.probs.values()]

    def select_sequences(self, keep: list[int]) -> HashTable:
        """The table of the batch's sequences `keep` (the others were dropped: their deadline passed)."""

        def rows(by_layer: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            return {layer: t[keep] for layer, t in by_layer.items()}

        return HashTable(rows(self.experts), rows(self.alphas), rows(self.probs))

    @classmethod
    def from_router_logits(cls, logits: dict[int, torch.Tensor], k: int = HIT_RANKS) -> HashTable:
        """A perfect table: the router's own ranking (used as an oracle and in tests)."""
        experts, alphas, ranked = {}, {}, {}
        for layer, lg in logits.items():
            probs = lg.float().softmax(-1)
            top = probs.topk(min(k, probs.shape[-1]), dim=-1)
            experts[layer] = top.indices
            alphas[layer] = top.values[..., 0]
            ranked[layer] = top.values
        return cls(experts, alphas, ranked)
