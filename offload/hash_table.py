"""The hash table: for every MoE layer and token of a batch, the predicted experts (best first) and α.

The predictor builds it ahead of inference; the MoE layer reads it to prefetch (`exact` mode) or to
route (`predicted` mode). Until the predictor exists, tests build it from the router itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HashTable:
    experts: dict[int, torch.Tensor]  # MoE layer → [batch, seq, k] expert ids, best first
    alphas: dict[int, torch.Tensor]  # MoE layer → [batch, seq] scaling factor of the top-1 expert

    def rows(self, layer: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Positions [start, start+length) of a layer, or None if the table does not cover them."""
        experts = self.experts.get(layer)
        if experts is None or start + length > experts.shape[1]:
            return None
        return experts[:, start : start + length], self.alphas[layer][:, start : start + length]

    def select_rows(self, rows: list[int]) -> HashTable:
        """The table of a batch from which some sequences were dropped (deadline passed)."""
        return HashTable({k: v[rows] for k, v in self.experts.items()}, {k: v[rows] for k, v in self.alphas.items()})

    def candidates(self, layer: int, k: int, start: int = 0, length: int | None = None, mask=None) -> list[int]:
        """Distinct experts among the top-k predictions of real tokens: what to make resident for this layer."""
        experts = self.experts.get(layer)
        if experts is None:
            return []
        length = experts.shape[1] - start if length is None else length
        if start + length > experts.shape[1] or length <= 0:
            return []
        top = experts[:, start : start + length, :k]  # [batch, length, k]
        if mask is not None:
            top = top[mask[:, start : start + length].bool()]
        return sorted(set(top.reshape(-1).tolist()))

    @classmethod
    def from_router_logits(cls, logits: dict[int, torch.Tensor], k: int = 3) -> HashTable:
        """A perfect table: the router's own ranking (used as an oracle and in tests)."""
        experts, alphas = {}, {}
        for layer, lg in logits.items():
            probs = lg.float().softmax(-1)
            top = probs.topk(min(k, probs.shape[-1]), dim=-1)
            experts[layer] = top.indices
            alphas[layer] = top.values[..., 0]
        return cls(experts, alphas)
