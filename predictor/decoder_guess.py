"""The decoder guess: a guess of each decoder MoE layer's experts for a decoder step, used to prefetch them
(the router still routes). Decoder tokens do not exist before generation, so no hash table can be built ahead.

The guess comes from the token generated at the previous step: `PrevTokenTable` counts, in teacher-forced
traces, which experts each decoder MoE layer used at positions whose decoder input was token v, and ranks the
most frequent. The first step's input is always the start token, and what follows it depends on the input
(classification prompts and continuations route it apart), so that step is keyed by the encoder's first token
instead (`decoder_keys`). `decoder_hit_rates` measures the table (real tokens only) against a frequency-only
baseline. sida serves with `DecoderGuess`, the table frozen into rankings: the engine's `DecodeStepGuesser`
(offload/contracts.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sida.offload.model_loader import LoadedModel
from sida.predictor.artifact import load_bound, save_bound
from sida.predictor.traces import trace_batch


def decoder_keys(
    decoder_input_ids: torch.Tensor, encoder_first: torch.Tensor, vocab_size: int, offset: int = 0
) -> torch.Tensor:
    """The table row [batch, steps] of each decoder position of `decoder_input_ids` [batch, steps]: its input
    token, but at the first step (offset 0) vocab_size + the encoder's first token `encoder_first` [batch]."""
    keys = decoder_input_ids.clone()
    if offset == 0:
        keys[:, 0] = vocab_size + encoder_first.to(keys.device)
    return keys


def decoder_routes(loaded: LoadedModel, batches):
    """Yield (layer, table keys [n], router top-1 [n]) over real decoder positions of teacher-forced batches."""
    vocab = loaded.config.vocab_size
    for input_ids, attention_mask, dec_ids, dec_mask in batches:
        keys = decoder_keys(dec_ids, input_ids[:, 0], vocab)[dec_mask.bool()]
        for t in trace_batch(loaded, input_ids, attention_mask, dec_ids, dec_mask):
            if t.stack == "decoder":
                yield t.layer, keys, t.expert


class PrevTokenTable:
    """Fits the decoder guess: counts [2 x vocab, experts] per decoder MoE layer of the router's choices, rows
    keyed by decoder input token, then first steps by encoder token."""

    def __init__(self, vocab_size: int, num_experts: int):
        self.counts: dict[int, torch.Tensor] = {}
        self.vocab_size = vocab_size
        self.shape = (2 * vocab_size, num_experts)

    def fit(self, routes) -> PrevTokenTable:
        """Add the routes' (layer, keys [n], router top-1 [n]) to the counts."""
        for layer, keys, expert in routes:
            c = self.counts.setdefault(layer, torch.zeros(self.shape, dtype=torch.long))
            c.index_put_((keys, expert), torch.ones_like(keys), accumulate=True)
        return self

    def scores(self, layer: int) -> torch.Tensor:
        """[2 x vocab, E]: counts, ties and unseen keys broken by the layer's overall frequency; a first step after
        an encoder token never seen first takes every first step's counts, pooled."""
        c = self.counts[layer].float()
        first = c[self.vocab_size :]  # a view: filled in place
        first[first.sum(-1) == 0] = first.sum(0)
        prior = c[: self.vocab_size].sum(0)  # [E]
        return c + prior / (prior.sum() + 1)

    def predict(self, layer: int, keys: torch.Tensor, k: int) -> torch.Tensor:
        """The decoder guess of `layer`: top-k experts [n, k] for table keys [n]."""
        return self.scores(layer)[keys].topk(k, dim=-1).indices


def decoder_hit_rates(table: PrevTokenTable, routes, ks=(1, 3)) -> dict:
    """Per decoder layer: the top-k hit rates of the table's decoder guess and of a frequency-only baseline, on
    `routes` (see `decoder_routes`)."""
    hits, base, tokens = {}, {}, {}
    for layer, keys, expert in routes:
        tokens[layer] = tokens.get(layer, 0) + expert.numel()
        prior = table.counts[layer][: table.vocab_size].sum(0).topk(max(ks)).indices
        ranked = table.predict(layer, keys, max(ks))
        for k in ks:
            hits[(layer, k)] = hits.get((layer, k), 0) + int((ranked[:, :k] == expert[:, None]).any(-1).sum())
            base[(layer, k)] = base.get((layer, k), 0) + int(torch.isin(expert, prior[:k]).sum())
    return {
        str(layer): {
            "tokens": n,
            **{f"prev_token_top{k}": round(hits[(layer, k)] / n, 4) for k in ks},
            **{f"frequency_top{k}": round(base[(layer, k)] / n, 4) for k in ks},
        }
        for layer, n in sorted(tokens.items())
    }


class DecoderGuess:
    """The decoder guess sida serves with: a fitted PrevTokenTable frozen into, per decoder MoE layer, every
    key's experts ranked best first ([2 x vocab, experts] int16). `predict` is a gather, cheap enough for every
    decoder step. `vocab_size` None: keyed by decoder input tokens only ([vocab, experts]), no first-step rows."""

    FILE = "decoder.safetensors"

    def __init__(self, ranked: dict[int, torch.Tensor], vocab_size: int | None = None):
        self.ranked = ranked
        self.vocab_size = vocab_size

    @classmethod
    def from_table(cls, table: PrevTokenTable) -> DecoderGuess:
        """Freeze a fitted PrevTokenTable: each key's experts ranked best first."""
        ranked = {layer: table.scores(layer).argsort(dim=-1, descending=True).to(torch.int16) for layer in table.counts}
        return cls(ranked, table.vocab_size)

    def keys(self, decoder_input_ids: torch.Tensor, encoder_first: torch.Tensor | None, offset: int) -> torch.Tensor:
        """`decoder_keys` [batch, steps] for this guess (the decoder input tokens alone where it has no first-step
        rows or no encoder tokens are given)."""
        if self.vocab_size is None or encoder_first is None:
            return decoder_input_ids
        rows, prompts = decoder_input_ids.shape[0], encoder_first.shape[0]
        if rows != prompts:  # generate() repeats each prompt's row for beams or several samples
            if rows % prompts:
                return decoder_input_ids
            encoder_first = encoder_first.repeat_interleave(rows // prompts)
        return decoder_keys(decoder_input_ids, encoder_first, self.vocab_size, offset)

    @property
    def layers(self) -> list[int]:
        """The decoder MoE layers guessed, in order."""
        return sorted(self.ranked)

    def to(self, device) -> DecoderGuess:
        """The same guess with its rankings on `device`."""
        return DecoderGuess({k: v.to(device) for k, v in self.ranked.items()}, self.vocab_size)

    def predict(self, layer: int, keys: torch.Tensor, k: int) -> torch.Tensor:
        """The decoder guess of `layer`: experts [..., k] for table keys [...] (see `keys`); keys beyond the table
        use its last row."""
        ranked = self.ranked[layer]
        return ranked[keys.clamp(0, ranked.shape[0] - 1), :k].long()

    def save(self, folder, fingerprint: str, info: dict) -> None:
        """Write `decoder.safetensors` into the predictor folder, with the model's fingerprint."""
        tensors = {f"layer{k}.ranked": v for k, v in self.ranked.items()}
        meta = {"info": json.dumps(info), "vocab_size": str(self.vocab_size or "")}
        save_bound(Path(folder) / self.FILE, tensors, fingerprint, meta)

    @classmethod
    def load(cls, folder, fingerprint: str) -> DecoderGuess | None:
        """The guess shipped in a predictor folder, or None; one built for another model is an error."""
        got = load_bound(Path(folder) / cls.FILE, fingerprint, "decoder guess")
        if got is None:
            return None
        tensors, meta = got
        ranked = {int(k.removeprefix("layer").split(".")[0]): v for k, v in tensors.items()}
        return cls(ranked, int(meta["vocab_size"]) if meta.get("vocab_size") else None)


def guess_hit_rates(guess: DecoderGuess, routes, ks=(1, 3)) -> dict:
    """Per decoder layer: share of real decoder positions whose router choice is in the guess's top-k."""
    hits: dict = {}
    tokens: dict = {}
    for layer, keys, expert in routes:
        tokens[layer] = tokens.get(layer, 0) + expert.numel()
        ranked = guess.predict(layer, keys, max(ks))
        for k in ks:
            hits[(layer, k)] = hits.get((layer, k), 0) + int((ranked[:, :k] == expert[:, None]).any(-1).sum())
    return {
        str(layer): {"tokens": n, **{f"top{k}": round(hits[(layer, k)] / n, 4) for k in ks}}
        for layer, n in sorted(tokens.items())
    }
