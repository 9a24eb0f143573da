"""Token-consistent encoder routing: count where the encoder routers send each token id, assign each token id
one expert (balanced across experts), and measure how decisive the routers are.

Trained Switch checkpoints route encoder tokens mostly by token identity; a small model trained from scratch
has near-uniform routers whose choice flips with small changes of context. The consistent stage fine-tunes
the routers towards a per-token assignment built here.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sida.offload.adapters import SparseBlock, SwitchAdapter, capture_routing

from .data import Prepared, make_batches


def encoder_layers(model: nn.Module) -> list[SparseBlock]:
    """The model's encoder MoE layers."""
    return [la for la in SwitchAdapter().moe_layers(model) if la.stack == "encoder"]


@torch.no_grad()
def token_routing(
    model: nn.Module, prep: Prepared, layers: list[SparseBlock], sequences: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per encoder MoE block, over real tokens of up to `sequences` training inputs (SST-2, MRPC and the C4
    prefixes, mixed): ([vocab, experts] counts of the router's choice per token id, [vocab, experts] sums of
    its router logits per token id)."""
    model.eval()
    vocab, experts = model.config.vocab_size, model.config.num_experts
    counts = {la.block: torch.zeros(vocab * experts, dtype=torch.long) for la in layers}
    sums = {la.block: torch.zeros(vocab, experts) for la in layers}
    pairs = [p for v in prep.data.values() for p in v]
    random.Random(prep.rng.random()).shuffle(pairs)
    for b in make_batches(pairs[:sequences], "mixed", 128, random.Random(0)):
        with capture_routing(layers) as cap:
            model.encoder(input_ids=b.input_ids, attention_mask=b.attention_mask)
        mask = b.attention_mask.bool()  # [batch, seq]
        ids = b.input_ids[mask]  # [real tokens]
        for la in layers:
            (rec,) = cap.records[la.index]
            counts[la.block] += torch.bincount(ids * experts + rec.expert[mask], minlength=vocab * experts)
            sums[la.block].index_add_(0, ids, rec.logits[mask])
    model.train()
    return {block: (c.view(vocab, experts), sums[block]) for block, c in counts.items()}


def balanced_assignment(
    counts: torch.Tensor, logit_sums: torch.Tensor, slack: float, iters: int = 2000
) -> torch.Tensor:
    """[vocab] expert per token id, -1 for token ids unseen in `counts` [vocab, experts] (no target).

    Each seen token id gets the expert of argmax(mean router logits + b), with one offset b per expert chosen
    (dual ascent) so that every expert holds between 1 / (slack·E) and slack / E of the token occurrences.
    Offsets keep the assignment a linear function of the routers' scores, so a router can learn it."""
    freq = counts.sum(1).double()
    seen = freq > 0
    scores = logit_sums[seen].double() / freq[seen, None]  # [seen tokens, experts] mean router logits
    weight = freq[seen] / freq[seen].sum()
    experts = scores.shape[1]
    step = 0.05 * float(scores.std())
    offsets = torch.zeros(experts, dtype=torch.float64)
    best, best_max = None, float("inf")
    for _ in range(iters):
        choice = (scores + offsets).argmax(1)
        load = torch.bincount(choice, weights=weight, minlength=experts) * experts  # 1.0 = an even share
        spread = max(float(load.max()), 1.0 / max(float(load.min()), 1e-9))
        if spread < best_max:
            best, best_max = choice, spread
        if best_max <= slack:
            break
        offsets -= step * (load - 1.0)
    target = torch.full((counts.shape[0],), -1, dtype=torch.long)
    target[seen] = best
    return target


@dataclass
class TokenAssignment:
    """Per encoder MoE block: routing counted per token id and the balanced expert assignment derived from it."""

    counts: dict[int, torch.Tensor]  # block -> [vocab, experts] router choices per token id
    sums: dict[int, torch.Tensor]  # block -> [vocab, experts] summed router logits per token id
    targets: dict[int, torch.Tensor]  # block -> [vocab] assigned expert, -1 for unseen token ids
    slack: float

    @classmethod
    def count(cls, model: nn.Module, prep: Prepared, layers: list[SparseBlock], sequences: int, slack: float):
        """Count the model's routing on `sequences` training inputs and assign each token id an expert."""
        stats = token_routing(model, prep, layers, sequences)
        assignment = cls({b: c for b, (c, _) in stats.items()}, {b: z for b, (_, z) in stats.items()}, {}, slack)
        assignment.reassign()
        return assignment

    def reassign(self) -> None:
        """Derive `targets` from the current counts."""
        self.targets = {b: balanced_assignment(self.counts[b], self.sums[b], self.slack) for b in self.counts}

    def recount(self, model: nn.Module, prep: Prepared, layers: list[SparseBlock], sequences: int) -> None:
        """Add a fresh count of the routing, the older counts weighing half as much, and re-derive the targets."""
        for block, (c, z) in token_routing(model, prep, layers, sequences).items():
            self.counts[block] = self.counts[block] // 2 + c
            self.sums[block] = self.sums[block] / 2 + z
        self.reassign()

    def majority_agreement(self) -> dict[int, float]:
        """Per block: how often the counted routing chose each token id's most frequent expert."""
        return {b: round(float(c.max(1).values.sum() / c.sum()), 4) for b, c in self.counts.items()}

    def agreement(self, counts: dict[int, torch.Tensor]) -> dict[int, float]:
        """Per block: the share of counted router choices (`counts`: block -> [vocab, experts]) on the target."""
        return {
            b: round(float(c.gather(1, self.targets[b].clamp(min=0)[:, None]).sum() / c.sum()), 4)
            for b, c in counts.items()
        }

    def cross_entropy(self, routed: list[tuple[int, torch.Tensor]], input_ids, attention_mask) -> torch.Tensor:
        """Mean over `routed` (block, [batch, seq, experts] router logits) of the routers' cross-entropy against
        the targets of the real tokens of `input_ids` [batch, seq] that have one."""
        mask = attention_mask.bool()
        terms = []
        for block, logits in routed:
            want = self.targets[block][input_ids][mask]  # [real tokens]
            known = want >= 0
            terms.append(nn.functional.cross_entropy(logits.float()[mask][known], want[known]))
        return torch.stack(terms).mean()


@contextmanager
def training_router_logits(layers: list[SparseBlock]) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """A list that receives (block, [batch, seq, experts] router logits) from every training-mode forward of these
    layers' routers (fit()'s held-out evaluations run in eval mode and are not kept); the hooks go when the
    block ends."""
    seen: list[tuple[int, torch.Tensor]] = []

    def keep(module, _inputs, outputs, block) -> None:
        if module.training:
            seen.append((block, outputs[2]))

    hooks = [la.router.register_forward_hook(lambda m, i, o, block=la.block: keep(m, i, o, block)) for la in layers]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def router_confidence(model: nn.Module, prep: Prepared, layers: list[SparseBlock]) -> dict:
    """Per encoder MoE block, on the held-out rows: mean top-1 router probability, mean top-1 − top-2 margin,
    experts used and the largest expert's share of tokens."""
    model.eval()
    top1 = {la.block: [] for la in layers}
    margin = {la.block: [] for la in layers}
    chosen = {la.block: [] for la in layers}
    for b in make_batches(prep.heldout, "sst2", 128, random.Random(0)):
        with capture_routing(layers) as cap:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        mask = b.attention_mask.bool()
        for la in layers:
            (rec,) = cap.records[la.index]
            p2 = rec.logits.softmax(-1).topk(2, dim=-1).values[mask]  # [real tokens, 2]
            top1[la.block].append(p2[:, 0])
            margin[la.block].append(p2[:, 0] - p2[:, 1])
            chosen[la.block].append(rec.expert[mask])
    model.train()
    out = {}
    for la in layers:
        counts = torch.bincount(torch.cat(chosen[la.block]), minlength=model.config.num_experts)
        out[la.block] = {
            "mean_top1_prob": round(float(torch.cat(top1[la.block]).mean()), 4),
            "mean_margin": round(float(torch.cat(margin[la.block]).mean()), 4),
            "experts_used": int((counts > 0).sum()),
            "max_share": round(float(counts.max() / counts.sum()), 4),
        }
    return out
