"""The SiDA MoE layer: replaces a Switch sparse MLP, routes its tokens and has the model's `ExpertExecutor` run only
the experts they use, from cache slots.

Routing comes from the model's router (`exact`) or from the hash table (`predicted`). Switch semantics are
kept so that `exact` equals Hugging Face: top-1, router in fp32 with no jitter in eval, per-sequence expert
capacity (tokens over capacity skip the MoE and pass through the residual), output scaled by α.
Padding tokens of the encoder are not sent to any expert: no real token can see their output.
`NextLayerExperts` tells the executor what to load while a layer computes: the next MoE layer's predicted experts,
each with its chance of being needed (calibration.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from sida.offload.calibration import Calibration, expected_use
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

    def hit_rates(self, layer_stack: dict[int, str], causal: bool) -> dict:
        """{"hash_hit_rate": {"top1": …}, "decoder_hash_hit_rate": …} over the layers of each stack (`layer_stack`:
        layer → "encoder" or "decoder") that were scored. A decoder-only (`causal`) model's layers are scored on the
        prompt's tokens, against the batch's hash table: its `hash_hit_rate`."""
        out = {}
        # one C-level copy each: the inference thread may add a layer's first key while /info reads
        lookups_by_layer, hits_by_key = dict(self.hash_lookups), dict(self.hash_hits)
        decoder_key = "hash_hit_rate" if causal else "decoder_hash_hit_rate"
        for stack, key in (("encoder", "hash_hit_rate"), ("decoder", decoder_key)):
            layers = {la for la, s in layer_stack.items() if s == stack}
            lookups = sum(n for la, n in lookups_by_layer.items() if la in layers)
            if not lookups:
                continue
            hits: dict[int, int] = {}
            for (la, k), n in hits_by_key.items():
                if la in layers:
                    hits[k] = hits.get(k, 0) + n
            out[key] = {f"top{k}": round(hits[k] / lookups, 6) for k in sorted(hits)}
        return out

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
    # each guess source ("table", "decoder", "ahead") of each MoE layer, calibrated against the router's real
    # choices; kept across batches (what was learned is not reset with the statistics)
    calibration: dict[tuple[str, int], Calibration] = field(default_factory=dict)
    expected: dict[int, dict[int, float]] = field(default_factory=dict)  # this pass: layer → {expert: chance of use}
    routes: int = 1  # experts each token is routed to
    num_experts: int = 0  # experts of each MoE layer
    encoder_layers: frozenset = frozenset()  # MoE layers of an encoder stack (their padding is masked)

    def expect_pass(self, table: bool = True) -> dict[ExpertKey, float]:
        """This pass's expectations (`expected`), for the layers a guess covers: the hash table's (unless not
        `table`: a later decoder step), over real tokens from the first position, and the decoder guess of the step.
        Returns them by key, the policy's predicted future."""
        self.expected = {}
        table = self.hash_table if table else None
        for layer in table.experts if table is not None else ():
            experts = table.experts[layer]  # [batch, seq, K]
            probs = table.probs.get(layer)
            mask = self.token_mask if layer in self.encoder_layers or self.causal else None
            if mask is not None and mask.shape[1] == experts.shape[1]:
                real = mask.bool()
                ranked, probs = experts[real], None if probs is None else probs[real]
            else:
                ranked, probs = experts.reshape(-1, experts.shape[-1]), None if probs is None else probs.flatten(0, 1)
            self.expected[layer] = self.chances(("table", layer), ranked, probs)
        for layer, (_first, guess) in self.decoder_guesses.items():
            if layer not in self.expected:
                ranked = guess.reshape(-1, guess.shape[-1])
                self.expected[layer] = self.chances(("decoder", layer), ranked, None)
        return {(la, e): p for la, by_expert in self.expected.items() for e, p in by_expert.items()}

    def observe(
        self, source: tuple[str, int], ranked: torch.Tensor, probs: torch.Tensor | None, choices: torch.Tensor
    ) -> None:
        """Count real tokens' guesses `ranked` [n, K] of `source` ((kind, layer)) against the router's `choices`
        [n, k] (exact mode: the router routes, so every guess is scored)."""
        if self.mode == "exact" and ranked.numel():
            self.calibration.setdefault(source, Calibration()).observe(ranked, probs, choices, self.routes)

    def chances(self, source: tuple[str, int], ranked: torch.Tensor, probs: torch.Tensor | None) -> dict[int, float]:
        """{expert: chance it is used} from real tokens' guesses `ranked` [n, K] of `source`, the first `prefetch_k`
        ranks weighed (at least `routes`: a token uses that many experts): calibrated in exact mode; in predicted mode
        the table routes, so its first `routes` ranks are certain and the others unused."""
        depth = max(self.prefetch_k, self.routes)
        ranked, probs = ranked[:, :depth], None if probs is None else probs[:, :depth]
        if self.mode == "predicted":
            chance = (torch.arange(ranked.shape[1]) < self.routes).double().expand(ranked.shape)
            return expected_use(ranked, chance, self.num_experts)
        cal = self.calibration.setdefault(source, Calibration())
        chance = cal.calibrated(ranked, probs, self.routes)
        return expected_use(ranked, chance, self.num_experts, cal.weights(self.num_experts))

    def layer_chances(self, layer: int) -> dict[ExpertKey, float]:
        """{key: chance it is used} of `layer`'s experts, likeliest first: this pass's expectations, or in a decode
        step the guess made a layer ahead; empty where there is neither."""
        chances = self.expected.get(layer)
        if chances is None and self.lookahead is not None:
            guess = self.lookahead.guesses.get(layer)
            if guess is not None:
                chances = self.chances(("ahead", layer), guess, None)
        return {(layer, e): p for e, p in (chances or {}).items()}

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
                self._count_hits(self._router(hidden_states)[2].argmax(-1), experts, None, None)
            return self._apply_capacity(experts[..., 0]), alpha
        if ctx.mode == "predicted":
            self.stats.router_fallbacks += 1
        expert, top_prob, logits = self._router(hidden_states)
        seq = hidden_states.shape[1]
        guess, probs, source = None, None, "table"
        if predicted is not None:
            guess, probs = predicted[0], table.probabilities(self.index, start, seq)
        elif self.stack == "decoder":
            guess, source = ctx.decoder_guess(self.index, start), "decoder"
            guess = guess[:, :seq] if guess is not None and guess.shape[1] >= seq else None
        if guess is not None:
            self._count_hits(logits.argmax(-1), guess, probs, source)  # the router's choice before any capacity drop
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

    def _count_hits(
        self, router_choice: torch.Tensor, predicted: torch.Tensor, probs: torch.Tensor | None, source: str | None
    ) -> None:
        """Count real tokens whose router choice [batch, seq] is among the top-1..k of `predicted` [batch, seq, k]
        (with its `probs`), and calibrate `source` with them."""
        mask = None
        if self.stack == "encoder" and self.context.token_mask is not None:
            mask = self.context.token_mask.bool()
        self.stats.count(self.index, router_choice, predicted, mask)
        if source is not None:
            pick = (lambda t: t[mask]) if mask is not None else (lambda t: t.flatten(0, 1))  # real tokens [n, ...]
            ranked, choices = pick(predicted), pick(router_choice)[:, None]
            self.context.observe((source, self.index), ranked, None if probs is None else pick(probs), choices)


class NextLayerExperts:
    """What to load while a MoE layer computes: the next MoE layer's predicted experts, each with its chance of being
    needed, from the pass's expectations (the hash table, or for a decoder layer the step's decoder guess: Switch) or
    the layer-ahead guess (a decoder-only model's decode step). The executor's `next_keys`."""

    def __init__(self, context: RoutingContext, following: dict[int, tuple[int, str]]):
        self.context = context
        self.following = following  # layer → (the MoE layer after it, its stack); absent after the last

    def __call__(self, layer: int) -> dict[ExpertKey, float]:
        """{key: chance} of the experts to load for the MoE layer after `layer`, likeliest first."""
        if layer not in self.following:
            return {}
        return self.context.layer_chances(self.following[layer][0])
