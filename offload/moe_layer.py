"""The SiDA MoE layer: replaces a Switch sparse MLP, routes its tokens and has the model's `ExpertExecutor` run only
the experts they use, from cache slots.

Routing comes from the model's router (`exact`) or from the hash table (`predicted`). Switch semantics are
kept so that `exact` equals Hugging Face: top-1, router in fp32 with no jitter in eval, per-sequence expert
capacity (tokens over capacity skip the MoE and pass through the residual), output scaled by α.
Padding tokens of the encoder are not sent to any expert: no real token can see their output.
`NextLayerExperts` tells the executor what to load while a layer computes: the next MoE layer's predicted experts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from sida.offload.expert_execution import ExpertExecutor
from sida.offload.expert_layout import ExpertKey
from sida.offload.hash_table import HashTable
from sida.offload.lookahead import RouterAhead


@dataclass
class RoutingStats:
    """Running counts of hash-table hits, for eval and metrics: a hit is the router's real choice for a real
    token found among the top-k predicted experts."""

    hash_lookups: Counter = field(default_factory=Counter)  # layer → real tokens checked
    hash_hits: Counter = field(default_factory=Counter)  # (layer, k) → tokens whose router choice was in top-k
    router_fallbacks: int = 0  # predicted mode: layer calls the table did not cover, routed by the router
    decode_lookups: Counter = field(default_factory=Counter)  # layer → decode-step router choices checked
    decode_hits: Counter = field(default_factory=Counter)  # layer → ... found among the layer-ahead guess

    def clear(self) -> None:
        """Start counting afresh (the SiDA layers keep this same object)."""
        self.hash_lookups.clear()
        self.hash_hits.clear()
        self.router_fallbacks = 0
        self.decode_lookups.clear()
        self.decode_hits.clear()

    def count_decode(self, layer: int, router_choice: torch.Tensor, guess: torch.Tensor) -> None:
        """Count a decode step's router choices [tokens, k] (-1: none) found among the guessed [tokens, k']."""
        real = router_choice >= 0
        found = (router_choice[:, :, None] == guess[:, None, :]).any(-1) & real  # [tokens, k]
        self.decode_lookups[layer] += int(real.sum())
        self.decode_hits[layer] += int(found.sum())

    def decode_recall(self) -> dict[str, float]:
        """The share of decode-step router choices the layer-ahead guess had: over every layer ("all") and per layer
        (by its index); empty before any decode step was scored."""
        lookups, hits = dict(self.decode_lookups), dict(self.decode_hits)
        total = sum(lookups.values())
        if not total:
            return {}
        by_layer = {str(la): round(hits.get(la, 0) / n, 6) for la, n in sorted(lookups.items()) if n}
        return {"all": round(sum(hits.values()) / total, 6), **by_layer}

    def count(
        self, layer: int, router_choice: torch.Tensor, predicted: torch.Tensor, mask: torch.Tensor | None = None
    ) -> None:
        """Count the real tokens (`mask` [batch, seq], all where None) whose router choice [batch, seq] is among
        the top-1..k of `predicted` [batch, seq, k]."""
        choice = router_choice if mask is None else router_choice[mask]  # [real tokens]
        pred = predicted if mask is None else predicted[mask]  # [real tokens, k]
        choice, pred = choice.reshape(-1), pred.reshape(choice.numel(), -1)
        self.hash_lookups[layer] += choice.numel()
        match = pred == choice[:, None]  # [real tokens, k]
        for k in range(1, pred.shape[1] + 1):
            self.hash_hits[(layer, k)] += int(match[:, :k].any(-1).sum())


@dataclass
class RoutingContext:
    """Per-batch routing state shared by all SiDA layers of one model; reset by `OffloadEngine.begin_batch`."""

    mode: str  # "exact" | "predicted"
    prefetch_k: int = 1
    hash_table: HashTable | None = None
    token_mask: torch.Tensor | None = None  # [batch, enc_seq] encoder attention mask
    offsets: Counter = field(default_factory=Counter)  # layer → positions already processed (decoder steps)
    shadow: bool = False  # predicted mode: also run the router (output unused) to count live hits
    causal: bool = False  # a decoder-only model: `token_mask` is the prompt's, read by its first call of a layer
    # the decoder guess of the current decoder step: layer → (its first position, experts [batch, steps, k]);
    # decoder layers are always routed by their router, the guess only prefetches and is scored
    decoder_guesses: dict = field(default_factory=dict)
    decoding: bool = False  # a decoder-only model's decode step of the running batch (no table, no mask)
    lookahead: RouterAhead | None = None  # a decoder-only model's decode-step guesses, a layer ahead

    def decoder_guess(self, layer: int, position: int) -> torch.Tensor | None:
        """[batch, positions from `position` on, k] guessed experts of a decoder layer, if this step has them."""
        got = self.decoder_guesses.get(layer)
        if got is None:
            return None
        first, guess = got
        pos = position - first
        return guess[:, pos:] if 0 <= pos < guess.shape[1] else None


class SiDAMoELayer(nn.Module):
    """A Switch sparse MLP: routes by the router or the hash table, then runs its experts through the model's
    `ExpertExecutor` with k = 1."""

    def __init__(
        self,
        index: int,
        stack: str,
        router: nn.Module,
        executor: ExpertExecutor,
        context: RoutingContext,
        stats: RoutingStats,
        num_experts: int,
        expert_capacity: int,
    ):
        super().__init__()
        self.index = index
        self.stack = stack
        self.router = router  # kept in both modes; `predicted` calls it only where the table has no rows
        router.classifier.to(router.dtype)  # the router computes in its own dtype (fp32), as Hugging Face casts it
        self.executor = executor  # shared by every SiDA layer of the model
        self.context = context
        self.stats = stats
        self.num_experts = num_experts
        self.expert_capacity = expert_capacity  # Switch: tokens one expert takes per sequence

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[batch, seq, d_model] → the MoE output of the same shape (zeros where no expert ran)."""
        batch, seq, d_model = hidden_states.shape
        ctx = self.context
        start = ctx.offsets[self.index]
        ctx.offsets[self.index] += seq
        expert, alpha = self._route(hidden_states, start)  # [batch, seq] (-1 = no expert), [batch, seq]
        if self.stack == "encoder" and ctx.token_mask is not None:
            expert = expert.masked_fill(~ctx.token_mask.bool(), -1)
        flat = hidden_states.reshape(-1, d_model)  # [tokens, d_model]
        top_k_index = expert.reshape(-1, 1)  # [tokens, 1]
        top_k_weights = alpha.reshape(-1, 1).to(hidden_states.dtype)  # [tokens, 1]
        out = self.executor(flat, top_k_index, top_k_weights, self.index)  # [tokens, d_model]
        return out.view(batch, seq, d_model)

    def _route(self, hidden_states: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert [batch, seq], -1 where the token goes to none; α [batch, seq]) for positions from `start`."""
        ctx = self.context
        table = ctx.hash_table
        predicted = table.positions(self.index, start, hidden_states.shape[1]) if table is not None else None
        if ctx.mode == "predicted" and predicted is not None:
            experts, alpha = predicted
            if ctx.shadow:
                self._count_hits(self._router(hidden_states)[2].argmax(-1), experts)
            return self._apply_capacity(experts[..., 0]), alpha
        if ctx.mode == "predicted":
            self.stats.router_fallbacks += 1
        expert, top_prob, logits = self._router(hidden_states)
        guess = predicted[0] if predicted is not None else None
        if guess is None and self.stack == "decoder":
            guess = ctx.decoder_guess(self.index, start)
            seq = hidden_states.shape[1]
            guess = guess[:, :seq] if guess is not None and guess.shape[1] >= seq else None
        if guess is not None:
            self._count_hits(logits.argmax(-1), guess)  # the router's choice before any capacity drop
        return expert, top_prob

    def _router(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Switch's top-1 router from its classifier, as transformers computes it: (expert [batch, seq] with the
        capacity applied, -1 where dropped; its probability [batch, seq]; logits [batch, seq, experts]). Computed
        here, not by calling the router module, whose outputs changed between transformers 5 releases (5.17
        returns the top probability where the logits should be, and applies no capacity)."""
        r = self.router
        logits = r.classifier(hidden_states.to(r.dtype))  # [batch, seq, experts]
        probs = nn.functional.softmax(logits, dim=-1, dtype=r.dtype).to(hidden_states.dtype)
        top_prob, expert = probs.max(-1)
        return self._apply_capacity(expert), top_prob, logits

    def _apply_capacity(self, expert: torch.Tensor) -> torch.Tensor:
        """Switch's rule: per sequence, an expert takes its first `capacity` tokens; later ones are dropped."""
        one_hot = nn.functional.one_hot(expert, self.num_experts)  # [batch, seq, experts]
        priority = (one_hot.cumsum(dim=1) * one_hot).sum(-1)  # [batch, seq], 1-based rank within the expert
        return expert.masked_fill(priority > self.expert_capacity, -1)

    def _count_hits(self, router_choice: torch.Tensor, predicted: torch.Tensor) -> None:
        """Count real tokens whose router choice [batch, seq] is among the top-1..k of `predicted` [batch, seq, k]."""
        mask = None
        if self.stack == "encoder" and self.context.token_mask is not None:
            mask = self.context.token_mask.bool()
        self.stats.count(self.index, router_choice, predicted, mask)


class NextLayerExperts:
    """What to load while a MoE layer computes: the next MoE layer's predicted experts (top-k of its real tokens),
    from the hash table or, for a decoder layer, the step's decoder guess (Switch) or layer-ahead guess (a decoder-only
    model's decode step). The executor's `next_keys`."""

    def __init__(self, context: RoutingContext, following: dict[int, tuple[int, str]]):
        self.context = context
        self.following = following  # layer → (the MoE layer after it, its stack); absent after the last

    def __call__(self, layer: int) -> list[ExpertKey]:
        """The keys of the experts to load for the MoE layer after `layer`."""
        ctx = self.context
        if layer not in self.following:
            return []
        nxt, stack = self.following[layer]
        table = ctx.hash_table
        if stack == "encoder":
            experts = [] if table is None else table.candidates(nxt, ctx.prefetch_k, mask=ctx.token_mask)
        else:  # the next decoder call processes the positions from its offset on
            start = ctx.offsets[nxt]
            mask = ctx.token_mask if ctx.causal and start == 0 else None  # a decoder-only prompt: its real tokens
            experts = [] if table is None else table.candidates(nxt, ctx.prefetch_k, start=start, mask=mask)
            if not experts and ctx.lookahead is not None:  # a decode step: the guess made a layer ahead
                return ctx.lookahead.keys(nxt)
            guess = ctx.decoder_guess(nxt, start) if not experts else None
            if guess is not None:
                experts = sorted(set(guess[..., : ctx.prefetch_k].reshape(-1).tolist()))
        return [(nxt, e) for e in experts]
