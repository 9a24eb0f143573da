"""A decode step's experts, predicted a layer ahead: no hash table covers a token that did not exist when its batch
was hashed, so while one MoE layer computes, the next MoE layer's experts are scored from the hidden state entering
this layer's experts and the embedding of the token the step reads, and the top-k start loading where their
calibrated chance pays for the read (the executor's `next_keys`, `moe_layer.NextLayerExperts`); the first MoE
layer's, from the embedding alone, before the step's forward. The scorer is the trained decode-step predictor
where the model ships one (`ahead.safetensors`, `predictor/decode_ahead.py`), else the next layer's own router
applied ahead (mixtral-offloading's gate-ahead prefetch, `RouterScorer`). The router still routes every token: a
wrong guess costs a load, never a wrong answer.

Each guess is scored when its layer runs: decode-step recall, the share of the router's k choices that were among
the k guessed (`RoutingStats.decode_hits` / `decode_lookups`, per layer).
"""

from __future__ import annotations

import torch
from torch import nn

from sida.offload.contracts import LayerAheadScorer


def router_projection(router: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [experts, H], bias [experts] or None) of a decoder-only family's router: its logits are
    `hidden @ weight.T + bias` before any family-specific scoring (softmax, sigmoid, group limits), which keeps the
    ranking the top-k reads closely enough for a prefetch guess."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(router).__name__} has no [experts, hidden] weight to apply ahead")
    bias = getattr(router, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


class RouterScorer:
    """Scores a layer's experts for a decode step with that layer's own router, applied ahead: to the hidden state
    entering the previous MoE layer's experts, or (the first layer) to the token's embedding."""

    def __init__(self, routers: dict[int, nn.Module]):
        self.projections = {layer: router_projection(r) for layer, r in routers.items()}
        self.first = min(routers)

    def __call__(self, layer: int, previous: torch.Tensor | None, token_emb: torch.Tensor) -> torch.Tensor:
        """logits [tokens, experts] of `layer` from `previous` [tokens, H], or for the first layer from the
        embedding of the token the step reads (the last H of `token_emb`)."""
        weight, bias = self.projections[layer]
        x = token_emb[:, -weight.shape[1] :] if layer == self.first or previous is None else previous
        return nn.functional.linear(x.to(weight.dtype), weight, bias)


class RouterAhead:
    """Guesses each MoE layer's experts for the current decode step from the layer before it, with `scorer`: the
    model's own routers (`RouterScorer`) or the trained decode-step predictor (`predictor/decode_ahead.py`)."""

    def __init__(self, scorer: LayerAheadScorer, following: dict[int, int], embeddings: nn.Module, k: int):
        self.scorer = scorer
        self.following = following  # MoE layer → the MoE layer after it within the step
        self.first = min([*following, *following.values()], default=0)
        self.embeddings = embeddings
        self.k = k
        self.token_emb: torch.Tensor | None = None  # [rows, 2H] embeddings of the token before, the token read
        self.guesses: dict[int, torch.Tensor] = {}  # layer → experts [tokens, k] guessed for this step
        self.last = max([*following, *following.values()], default=0)
        self.last_hidden: torch.Tensor | None = None  # [rows, H] entering the last MoE layer's experts, last step

    def begin_step(self, input_ids: torch.Tensor) -> None:
        """A decode step reads the last of `input_ids` [rows, 2] (the token before it first): forget the last step's
        guesses and guess the first MoE layer's experts from the tokens' embeddings (`guesses[first]`)."""
        rows = input_ids.shape[0]
        with torch.inference_mode():
            self.token_emb = self.embeddings(input_ids[:, -2:]).reshape(rows, -1)  # [rows, 2H]
            before = self.last_hidden if self.last_hidden is not None and len(self.last_hidden) == rows else None
            self.guesses = {self.first: self._top_k(self.first, before)}

    def reset(self) -> None:
        """A new batch: no row has a step before."""
        self.last_hidden = None

    def rows_changed(self, keep: list[int], added: int) -> None:
        """The running batch kept rows `keep` of the last step (in this order) and then took `added` new rows,
        which have no step before (zeros, as the trained predictor saw a sequence's first decode step)."""
        h = self.last_hidden
        if h is None:
            return
        kept = h[torch.tensor(keep, dtype=torch.long, device=h.device)] if keep else h[:0]
        self.last_hidden = torch.cat([kept, h.new_zeros(added, h.shape[1])])

    def observe(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, stats) -> torch.Tensor | None:
        """`layer` runs its experts on `hidden` [tokens, H] with the router's choice `top_k_index` [tokens, k]: score
        its guess, and guess the next MoE layer's experts from the same hidden state. Returns the guess scored
        [tokens, k], if there was one."""
        guess = self.guesses.pop(layer, None)
        if guess is not None and guess.shape[0] != top_k_index.shape[0]:
            guess = None
        if guess is not None:
            stats.count_decode(layer, top_k_index, guess)
        if layer == self.last:
            self.last_hidden = hidden.detach()
        nxt = self.following.get(layer)
        if nxt is not None and self.token_emb is not None and self.token_emb.shape[0] == hidden.shape[0]:
            with torch.inference_mode():
                self.guesses[nxt] = self._top_k(nxt, hidden)
        return guess

    def _top_k(self, layer: int, previous: torch.Tensor | None) -> torch.Tensor:
        logits = self.scorer(layer, previous, self.token_emb)
        return logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices
