"""Keeping every decoder expert in use: count which experts the decoder's tokens reach, and split busy experts
into idle ones.

Decoder MoE layers see one token per classification example, so the per-sequence load-balancing loss cannot
keep all their experts busy. An idle expert gets a copy of a busy one, and the pair's router rows are pushed
apart so that they share the busy one's tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

from sida.offload.adapters import SwitchAdapter, capture_routing

from .data import IGNORE, Prepared, make_batches

# block -> ([experts] tokens per expert, per expert: [tokens, d_model] router inputs it received, or None)
Usage = dict[int, tuple[torch.Tensor, list[torch.Tensor | None]]]


@torch.no_grad()
def decoder_usage(model: nn.Module, prep: Prepared, batches: int = 40) -> Usage:
    """Per decoder MoE block: tokens per expert and the router inputs each expert received, on teacher-forced
    completion batches (padding excluded)."""
    adapter = SwitchAdapter()
    layers = [la for la in adapter.moe_layers(model) if la.stack == "decoder"]
    experts = model.config.num_experts
    counts = {la.block: torch.zeros(experts, dtype=torch.long) for la in layers}
    inputs = {la.block: [[] for _ in range(experts)] for la in layers}
    seen = {}  # block -> [batch, target, d_model] router input of the latest forward
    hooks = [
        la.router.register_forward_hook(lambda m, i, o, b=la.block: seen.__setitem__(b, i[0].detach().float()))
        for la in layers
    ]
    model.eval()
    try:
        for b in make_batches(prep.data["c4_lm"], "c4_lm", 64, random.Random(1))[:batches]:
            start = adapter.decoder_start_ids(model, len(b.labels))  # [batch, 1]
            dec_ids = torch.cat([start, b.labels[:, :-1].clamp(min=0)], dim=1)  # teacher forcing: shifted right
            with capture_routing(layers) as cap:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, decoder_input_ids=dec_ids)
            mask = b.labels != IGNORE  # [batch, target]
            for la in layers:
                chosen = cap.records[la.index][0].expert[mask]  # [real tokens]
                counts[la.block] += torch.bincount(chosen, minlength=experts)
                h = seen[la.block][mask]  # [real tokens, d_model]
                for e in chosen.unique().tolist():
                    inputs[la.block][e].append(h[chosen == e])
    finally:
        for hk in hooks:
            hk.remove()
    model.train()
    return {blk: (counts[blk], [torch.cat(x) if x else None for x in inputs[blk]]) for blk in counts}


def experts_used(usage: Usage) -> dict[int, int]:
    """Per decoder MoE block of a `decoder_usage` result: how many experts got any token."""
    return {block: int((counts > 0).sum()) for block, (counts, _) in usage.items()}


def idle_experts(counts: torch.Tensor, share: float = 0.05) -> torch.Tensor:
    """Indices of the experts given fewer than `share` of an even share of the tokens (`counts`: [experts]).

    A threshold above zero: an expert with a handful of C4 tokens gets none on other text."""
    return (counts < share * counts.sum() / counts.numel()).nonzero().flatten()


def split_offset(h: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """[d_model] δ for splitting an expert's tokens `h` [tokens, d_model] by router rows w ± δ (`router`:
    [experts, d_model]).

    δ lies along the tokens' main direction of variation (orthogonal to their mean), scaled so that a typical
    token prefers its side by the median top-1/top-2 logit gap of those tokens: about half go each way, and
    other experts' tokens are hardly disturbed."""
    mean = h.mean(0)
    centered = h - mean
    direction = torch.linalg.svd(centered, full_matrices=False).Vh[0]
    unit_mean = mean / mean.norm()
    direction = direction - (direction @ unit_mean) * unit_mean
    direction = direction / direction.norm()
    spread = (centered @ direction).abs().median().clamp(min=1e-6)
    top2 = (h @ router.T).topk(2, dim=-1).values  # [tokens, 2] the router's logits, as it chose
    margin = (top2[:, 0] - top2[:, 1]).median()
    return direction * (margin / 2) / spread


@torch.no_grad()
def split_dead_experts(model: nn.Module, usage: Usage, noise: float = 0.01, seed: int = 0) -> dict:
    """Give every idle decoder expert (see `idle_experts`) a copy of a busy one (plus `noise` × its std) and
    split the busy one's tokens between the two (see `split_offset`); returns {block: {idle: donor}}."""
    g = torch.Generator().manual_seed(seed)
    done = {}
    for block, (counts, inputs) in usage.items():
        mlp = model.decoder.block[block].layer[-1].mlp
        router = mlp.router.classifier.weight  # [experts, d_model]
        dead = idle_experts(counts).tolist()
        donors = counts.argsort(descending=True).tolist()[: len(dead)]
        for d, src in zip(dead, donors):
            delta = split_offset(inputs[src], router)
            for p_dst, p_src in zip(mlp.experts[f"expert_{d}"].parameters(), mlp.experts[f"expert_{src}"].parameters()):
                p_dst.copy_(p_src + noise * p_src.std() * torch.randn(p_src.shape, generator=g))
            base = router[src].clone()
            router[src].copy_(base + delta)
            router[d].copy_(base - delta)
        done[block] = dict(zip(dead, donors))
    return done


def split_idle_decoder_experts(
    model: nn.Module, prep: Prepared, out_dir: Path, seed: int, rounds: int = 3, usage: Usage | None = None
) -> tuple[list[dict], dict[int, int]]:
    """Split busy decoder experts into the idle ones (no fine-tune; up to `rounds` times, as a split can leave
    the copy with no tokens) and save the model if any was idle: ([{block: {idle: donor}} per round],
    {block: experts used afterwards}). `usage`: the model's `decoder_usage`, if the caller has it already."""
    usage = usage if usage is not None else decoder_usage(model, prep)
    splits = []
    while any(len(idle_experts(c)) for c, _ in usage.values()) and len(splits) < rounds:
        splits.append(split_dead_experts(model, usage, seed=seed + len(splits)))
        usage = decoder_usage(model, prep)
    if splits:
        model.save_pretrained(out_dir, safe_serialization=True)
    return splits, experts_used(usage)
