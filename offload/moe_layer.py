"""The SiDA MoE layer: replaces a model's sparse MLP and runs only the experts its tokens use, from cache slots.

Routing comes from the model's router (`exact`) or from the hash table (`predicted`). Switch semantics are
kept so that `exact` equals Hugging Face: top-1, router in fp32 with no jitter in eval, per-sequence expert
capacity (tokens over capacity skip the MoE and pass through the residual), output scaled by α.
Padding tokens of the encoder are not sent to any expert: no real token can see their output.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from sida.offload.device_cache import DeviceExpertCache
from sida.offload.hash_table import HashTable


@dataclass
class RoutingStats:
    """Running counts of hash-table hits, for eval and metrics: a hit is the router's real choice for a real
    token found among the top-k predicted experts."""

    hash_lookups: Counter = field(default_factory=Counter)  # layer → real tokens checked
    hash_hits: Counter = field(default_factory=Counter)  # (layer, k) → tokens whose router choice was in top-k
    router_fallbacks: int = 0  # predicted mode: layer calls the table did not cover, routed by the router

    def clear(self) -> None:
        """Start counting afresh (the SiDA layers keep this same object)."""
        self.hash_lookups.clear()
        self.hash_hits.clear()
        self.router_fallbacks = 0


@dataclass
class RoutingContext:
    """Per-batch routing state shared by all SiDA layers of one model; reset by `OffloadEngine.begin_batch`."""

    mode: str  # "exact" | "predicted"
    prefetch_k: int = 1
    hash_table: HashTable | None = None
    token_mask: torch.Tensor | None = None  # [batch, enc_seq] encoder attention mask
    offsets: Counter = field(default_factory=Counter)  # layer → positions already processed (decoder steps)
    shadow: bool = False  # predicted mode: also run the router (output unused) to count live hits
    # the decoder guess of the current decoder step: layer → (its first position, experts [batch, steps, k]);
    # decoder layers are always routed by their router, the guess only prefetches and is scored
    decoder_guesses: dict = field(default_factory=dict)


class SiDAMoELayer(nn.Module):
    """A Switch sparse MLP that runs its experts from cache slots, routed by the router or the hash table."""

    def __init__(
        self,
        index: int,
        stack: str,
        router: nn.Module,
        expert_forward,
        cache: DeviceExpertCache,
        context: RoutingContext,
        stats: RoutingStats,
        next_layer: int | None,
        next_stack: str | None,
        num_experts: int,
        expert_capacity: int,
    ):
        super().__init__()
        self.index = index
        self.stack = stack
        self.router = router  # kept in both modes; `predicted` calls it only where the table has no rows
        self.expert_forward = expert_forward
        self.cache = cache
        self.context = context
        self.stats = stats
        self.next_layer = next_layer
        self.next_stack = next_stack
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
        flat_expert = expert.reshape(-1)
        flat_alpha = alpha.reshape(-1, 1).to(hidden_states.dtype)
        out = torch.zeros_like(flat)
        needed = torch.unique(flat_expert[flat_expert >= 0]).tolist()
        keys = [(self.index, e) for e in needed]
        self.cache.cancel_prefetches(self.index, keys)  # guesses this layer turned out not to need
        upcoming = self._next_keys()
        waves = self.cache.waves(keys)
        for i, wave in enumerate(waves):
            params = self.cache.acquire(wave)
            held = list(wave)  # released whatever happens, so a failed batch leaves no expert pinned
            try:
                later = [k for w in waves[i + 1 :] for k in w]  # this layer's experts of the waves still to come
                if i == 0:  # copies for the next layer overlap this layer's compute, never evicting its experts
                    self.cache.prefetch(upcoming, protect=set(keys))
                for j, key in enumerate(wave):
                    tokens = torch.nonzero(flat_expert == key[1]).squeeze(1)  # ascending token order, as HF
                    y = self.expert_forward(params[key], flat[tokens])  # [n, d_model]
                    out.index_add_(0, tokens, (y * flat_alpha[tokens]).to(out.dtype))
                    # The expert is done: its slot may take what comes next (this layer's later waves first,
                    # then the next layer's predicted experts) while the rest of the wave computes.
                    held.remove(key)
                    self.cache.release([key])
                    if later or upcoming:
                        self.cache.prefetch(later + upcoming, protect=set(wave[j + 1 :]))
            finally:
                self.cache.release(held)
        return out.view(batch, seq, d_model)

    def _route(self, hidden_states: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert [batch, seq], -1 where the token goes to none; α [batch, seq]) for positions from `start`."""
        ctx = self.context
        table = ctx.hash_table
        predicted = table.positions(self.index, start, hidden_states.shape[1]) if table is not None else None
        if ctx.mode == "predicted" and predicted is not None:
            experts, alpha = predicted
            if ctx.shadow:
                self._count_hits(self.router(hidden_states)[2].argmax(-1), experts)
            return self._apply_capacity(experts[..., 0]), alpha
        if ctx.mode == "predicted":
            self.stats.router_fallbacks += 1
        one_hot, top_prob, logits = self.router(hidden_states)  # capacity already applied by the router
        expert = torch.where(one_hot.sum(-1) > 0, one_hot.argmax(-1), -1)
        guess = predicted[0] if predicted is not None else None
        if guess is None and self.stack == "decoder":
            guess = self._decoder_guess(self.index, start)
            seq = hidden_states.shape[1]
            guess = guess[:, :seq] if guess is not None and guess.shape[1] >= seq else None
        if guess is not None:
            self._count_hits(logits.argmax(-1), guess)  # the router's choice before any capacity drop
        return expert, top_prob.squeeze(-1)

    def _decoder_guess(self, layer: int, position: int) -> torch.Tensor | None:
        """[batch, positions from `position` on, k] guessed experts of a decoder layer, if this step has them."""
        got = self.context.decoder_guesses.get(layer)
        if got is None:
            return None
        first, guess = got
        pos = position - first
        return guess[:, pos:] if 0 <= pos < guess.shape[1] else None

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
        choice = router_choice if mask is None else router_choice[mask]  # [real tokens]
        pred = predicted if mask is None else predicted[mask]  # [real tokens, k]
        choice, pred = choice.reshape(-1), pred.reshape(choice.numel(), -1)
        self.stats.hash_lookups[self.index] += choice.numel()
        match = pred == choice[:, None]  # [real tokens, k]
        for k in range(1, pred.shape[1] + 1):
            self.stats.hash_hits[(self.index, k)] += int(match[:, :k].any(-1).sum())

    def _next_keys(self) -> list:
        """The next MoE layer's predicted experts (top-k of its real tokens), to load ahead of it."""
        ctx = self.context
        nxt = self.next_layer
        if nxt is None:
            return []
        table = ctx.hash_table
        if self.next_stack == "encoder":
            experts = [] if table is None else table.candidates(nxt, ctx.prefetch_k, mask=ctx.token_mask)
        else:  # the next decoder call processes the positions from its offset on
            start = ctx.offsets[nxt]
            experts = [] if table is None else table.candidates(nxt, ctx.prefetch_k, start=start)
            guess = self._decoder_guess(nxt, start) if not experts else None
            if guess is not None:
                experts = sorted(set(guess[..., : ctx.prefetch_k].reshape(-1).tolist()))
        return [(nxt, e) for e in experts]
