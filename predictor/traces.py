"""Router traces: which expert each *real* token went to in each MoE layer, aligned with its token.

Padding is dropped here, once (the paper's code counted it). Rows come out in (sequence, position)
order of the batch that produced them, so a trace row and its token never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sida.offload.adapters import capture_routing
from sida.offload.model_loader import LoadedModel
from sida.offload.runner import Runner


@dataclass
class LayerTrace:
    """One MoE layer's router decisions for the real tokens of one batch, in (sequence, position) order."""

    layer: int  # MoE layer index (encoder first)
    stack: str  # "encoder" | "decoder"
    expert: torch.Tensor  # [real_tokens] the router's top-1 expert
    top_prob: torch.Tensor  # [real_tokens] its router probability
    margin: torch.Tensor  # [real_tokens] top-1 minus top-2 probability


@torch.inference_mode()
def trace_batch(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    decoder_attention_mask: torch.Tensor,
) -> list[LayerTrace]:
    """One teacher-forced forward of encoder inputs [batch, seq] and decoder inputs [batch, steps]; the router
    decisions of every MoE layer for its real tokens, one LayerTrace per layer."""
    layers = loaded.adapter.moe_layers(loaded.model)
    with capture_routing(layers) as cap:
        loaded.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
        )
    traces = []
    for layer in layers:
        (record,) = cap.records[layer.index]  # one call per layer in a single forward
        mask = (attention_mask if layer.stack == "encoder" else decoder_attention_mask).bool()
        top2 = record.logits.softmax(-1).topk(2, dim=-1).values  # [batch, seq, 2]
        traces.append(
            LayerTrace(
                layer.index,
                layer.stack,
                record.expert[mask],
                record.top_prob[mask],
                (top2[..., 0] - top2[..., 1])[mask],
            )
        )
    return traces


def lm_batches(runner: Runner, texts: list[str], prefix_words: int = 40, batch_size: int = 32):
    """Teacher-forced prefix → continuation batches for `trace_batch`: the first `prefix_words` words of each text
    are the encoder input, the next 30 the decoder's target (decoder input = start token + target). Yields
    (input_ids, attention_mask) [batch, seq] and (decoder_input_ids, decoder_attention_mask) [batch, steps]."""
    pairs = [(" ".join(t.split()[:prefix_words]), " ".join(t.split()[prefix_words : prefix_words + 30])) for t in texts]
    for i in range(0, len(pairs), batch_size):
        part = pairs[i : i + batch_size]
        enc = runner.encode([p for p, _ in part])
        dec = runner.tokenizer([c for _, c in part], padding=True, return_tensors="pt")
        start = runner.loaded.decoder_start_ids(len(part))
        dec_ids = torch.cat([start, dec["input_ids"][:, :-1]], dim=1)
        dec_mask = torch.cat([torch.ones_like(start), dec["attention_mask"][:, :-1]], dim=1)
        yield enc["input_ids"], enc["attention_mask"], dec_ids, dec_mask


def classification_batches(runner: Runner, prompts: list[str], batch_size: int = 64):
    """Batches for `trace_batch` of the first decoder step only (what classification runs): encoder inputs
    [batch, seq] and the start token with its mask [batch, 1]."""
    for i in range(0, len(prompts), batch_size):
        enc = runner.encode(prompts[i : i + batch_size])
        start = runner.loaded.decoder_start_ids(enc["input_ids"].shape[0])
        yield enc["input_ids"], enc["attention_mask"], start, torch.ones_like(start)


def expert_usage(traces: list[list[LayerTrace]], num_experts: int) -> dict[int, torch.Tensor]:
    """Token counts per expert [num_experts], per MoE layer, summed over batches of traces."""
    usage: dict[int, torch.Tensor] = {}
    for batch in traces:
        for t in batch:
            counts = torch.bincount(t.expert, minlength=num_experts)
            usage[t.layer] = usage.get(t.layer, torch.zeros(num_experts, dtype=torch.long)) + counts
    return usage


# ------------------------------------------------------------------------------------ stored traces


@dataclass
class TraceSet:
    """Router traces of many inputs (encoder inputs, or a causal LM's prompts); row i of every tensor is input i
    (padding masked out)."""

    input_ids: torch.Tensor  # [rows, seq] int64, 0-padded
    attention_mask: torch.Tensor  # [rows, seq]
    top_idx: dict[int, torch.Tensor]  # MoE layer → [rows, seq, T] the router's top-T experts, best first
    top_prob: dict[int, torch.Tensor]  # MoE layer → [rows, seq, T] their router probabilities
    fingerprint: str

    @property
    def layers(self) -> list[int]:
        """The MoE layers traced, in order."""
        return sorted(self.top_idx)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def concat(cls, parts: list[TraceSet]) -> TraceSet:
        """The rows of every part, in order, padded to the widest; the parts must cover the same layers."""
        if len(parts) == 1:
            return parts[0]
        width = max(p.input_ids.shape[1] for p in parts)
        return cls(
            _pad_cat([p.input_ids for p in parts], width),
            _pad_cat([p.attention_mask for p in parts], width),
            {la: _pad_cat([p.top_idx[la] for p in parts], width) for la in parts[0].layers},
            {la: _pad_cat([p.top_prob[la] for p in parts], width) for la in parts[0].layers},
            parts[0].fingerprint,
        )

    def subset(self, rows: torch.Tensor) -> TraceSet:
        """The rows `rows` [n], trimmed to their widest real length."""
        width = int(self.attention_mask[rows].sum(1).max())
        return TraceSet(
            self.input_ids[rows, :width],
            self.attention_mask[rows, :width],
            {k: v[rows, :width] for k, v in self.top_idx.items()},
            {k: v[rows, :width] for k, v in self.top_prob.items()},
            self.fingerprint,
        )


def _pad_cat(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """Concatenate [rows, seq, ...] tensors along rows, right-padding each with zeros to `width` positions."""
    out = []
    for t in tensors:
        pad = width - t.shape[1]
        out.append(torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t)
    return torch.cat(out)


def _stacked(ids, masks, idx, prob, fingerprint: str) -> TraceSet:
    """One TraceSet from per-batch tensors, every batch right-padded to the widest."""
    width = max(t.shape[1] for t in ids)
    return TraceSet(
        _pad_cat(ids, width),
        _pad_cat(masks, width),
        {k: _pad_cat(v, width) for k, v in idx.items()},
        {k: _pad_cat(v, width) for k, v in prob.items()},
        fingerprint,
    )


@torch.inference_mode()
def collect_traces(
    loaded: LoadedModel, inputs: list[str], top_t: int = 30, batch_size: int = 64, max_tokens: int = 512, progress=None
) -> TraceSet:
    """Run the encoder (all experts resident) over `inputs`; their router top-`top_t` as a TraceSet in input
    order. `progress(done, total)` is called after each batch."""
    layers = [la for la in loaded.adapter.moe_layers(loaded.model) if la.stack == "encoder"]
    top_t = min(top_t, loaded.adapter.num_experts(loaded.model))
    encoder = loaded.model.get_encoder()
    ids, masks = [], []
    idx = {la.index: [] for la in layers}
    prob = {la.index: [] for la in layers}
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        enc = loaded.tokenizer(batch, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        with capture_routing(layers) as cap:
            encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        ids.append(enc["input_ids"])
        masks.append(enc["attention_mask"])
        for la in layers:
            (rec,) = cap.records[la.index]
            top = rec.logits.softmax(-1).topk(top_t, dim=-1)  # [batch, seq, T]
            idx[la.index].append(top.indices)
            prob[la.index].append(top.values)
        if progress is not None:
            progress(min(start + batch_size, len(inputs)), len(inputs))
    return _stacked(ids, masks, idx, prob, loaded.fingerprint)


@torch.inference_mode()
def collect_lm_traces(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str],
    fingerprint: str,
    top_t: int = 30,
    batch_size: int = 32,
    max_tokens: int = 128,
    progress=None,
) -> TraceSet:
    """Run a decoder-only MoE causal LM (all experts resident) over `texts`, each tokenized as the model reads a
    prompt (cut to `max_tokens`); their router top-`top_t` as a TraceSet in text order, MoE layer i = the model's
    i-th router. Rows are right-padded here, so causal attention keeps every real token's routing independent of
    the batch; padded positions hold zeros. `progress(done, total)` is called after each batch."""
    ids, masks = [], []
    idx: dict[int, list[torch.Tensor]] = {}
    prob: dict[int, list[torch.Tensor]] = {}
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_tokens)["input_ids"]
        width = max(len(e) for e in encoded)
        input_ids = torch.tensor([e + [0] * (width - len(e)) for e in encoded], dtype=torch.long)  # [batch, seq]
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], dtype=torch.long)
        out = model(input_ids=input_ids, attention_mask=mask, output_router_logits=True, use_cache=False)
        for layer, logits in enumerate(out.router_logits):  # one [batch * seq, E] tensor per MoE layer, in order
            top = logits.float().softmax(-1).topk(min(top_t, logits.shape[-1]), dim=-1)
            keep = mask[..., None]  # [batch, seq, 1]
            idx.setdefault(layer, []).append(top.indices.view(*input_ids.shape, -1) * keep)
            prob.setdefault(layer, []).append(top.values.view(*input_ids.shape, -1) * keep)
        ids.append(input_ids)
        masks.append(mask)
        if progress is not None:
            progress(min(start + batch_size, len(texts)), len(texts))
    return _stacked(ids, masks, idx, prob, fingerprint)


def save_traces(traces: TraceSet, path: str | Path) -> None:
    """Write a TraceSet as one safetensors file (compact dtypes) with the model's fingerprint."""
    tensors = {"input_ids": traces.input_ids.to(torch.int32), "attention_mask": traces.attention_mask.to(torch.int8)}
    for layer in traces.layers:
        tensors[f"layer{layer}.top_idx"] = traces.top_idx[layer].to(torch.int16).contiguous()
        tensors[f"layer{layer}.top_prob"] = traces.top_prob[layer].to(torch.float16).contiguous()
    save_file(tensors, str(path), metadata={"fingerprint": traces.fingerprint})


def load_traces(path: str | Path) -> TraceSet:
    """Read a TraceSet written by `save_traces`."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = sorted(int(k.removeprefix("layer").split(".")[0]) for k in tensors if k.endswith(".top_idx"))
    return TraceSet(
        tensors["input_ids"].long(),
        tensors["attention_mask"].long(),
        {la: tensors[f"layer{la}.top_idx"].long() for la in layers},
        {la: tensors[f"layer{la}.top_prob"].float() for la in layers},
        meta.get("fingerprint", ""),
    )


@torch.inference_mode()
def verify_alignment(loaded: LoadedModel, traces: TraceSet, rows: int = 16, seed: int = 0) -> float:
    """Re-run the model on a sample of rows and return the share of real tokens whose stored top-1 matches.

    Stored traces of the right tokens agree (≈1.0); traces paired with the wrong rows (the paper's bug) do not.
    """
    if traces.fingerprint and traces.fingerprint != loaded.fingerprint:
        raise ValueError(f"traces were collected on model {traces.fingerprint}, not {loaded.fingerprint}")
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(traces), generator=g)[:rows]
    part = traces.subset(sample)
    layers = [la for la in loaded.adapter.moe_layers(loaded.model) if la.index in part.top_idx]
    with capture_routing(layers) as cap:
        loaded.model.get_encoder()(input_ids=part.input_ids, attention_mask=part.attention_mask)
    mask = part.attention_mask.bool()
    agree = total = 0
    for la in layers:
        (rec,) = cap.records[la.index]
        agree += int((rec.expert[mask] == part.top_idx[la.index][..., 0][mask]).sum())
        total += int(mask.sum())
    return agree / max(1, total)
