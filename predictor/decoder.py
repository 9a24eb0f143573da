"""Decoder layers: their tokens do not exist before generation, so no hash table can be built ahead.

The cheapest per-step guess is from the token generated at the previous step: `PrevTokenTable` counts, in
teacher-forced traces, which experts each decoder MoE layer used at positions whose decoder input was
token v, and predicts the most frequent ones. `decoder_hit_rates` measures it (real tokens only) against a
frequency-only baseline, which is what decides whether decoder prefetch is worth wiring in.
"""

from __future__ import annotations

import torch

from offload.model_loader import LoadedModel
from predictor.traces import trace_batch


def decoder_routes(loaded: LoadedModel, batches):
    """Yield (layer, previous tokens [n], router top-1 [n]) over real decoder positions of teacher-forced batches."""
    for input_ids, attention_mask, dec_ids, dec_mask in batches:
        for t in trace_batch(loaded, input_ids, attention_mask, dec_ids, dec_mask):
            if t.stack == "decoder":
                yield t.layer, dec_ids[dec_mask.bool()], t.expert


class PrevTokenTable:
    def __init__(self, vocab_size: int, num_experts: int):
        self.counts: dict[int, torch.Tensor] = {}
        self.shape = (vocab_size, num_experts)

    def fit(self, routes) -> PrevTokenTable:
        for layer, prev, expert in routes:
            c = self.counts.setdefault(layer, torch.zeros(self.shape, dtype=torch.long))
            c.index_put_((prev, expert), torch.ones_like(prev), accumulate=True)
        return self

    def predict(self, layer: int, prev: torch.Tensor, k: int) -> torch.Tensor:
        """[n, k] experts; tokens never seen fall back to the layer's most used experts."""
        c = self.counts[layer].float()
        prior = c.sum(0)  # [E]
        scores = c[prev] + prior / (prior.sum() + 1)  # ties and unseen tokens broken by overall frequency
        return scores.topk(k, dim=-1).indices


def decoder_hit_rates(table: PrevTokenTable, routes, ks=(1, 3)) -> dict:
    hits, base, tokens = {}, {}, {}
    for layer, prev, expert in routes:
        tokens[layer] = tokens.get(layer, 0) + expert.numel()
        prior = table.counts[layer].sum(0).topk(max(ks)).indices
        ranked = table.predict(layer, prev, max(ks))
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
    """The frozen form of a PrevTokenTable that sida serves with: per decoder MoE layer, every token's experts
    ranked best first ([vocab, experts] int16). `predict` is a gather: cheap enough to run at every decoder step."""

    FILE = "decoder.safetensors"

    def __init__(self, ranked: dict[int, torch.Tensor]):
        self.ranked = ranked

    @classmethod
    def from_table(cls, table: PrevTokenTable) -> DecoderGuess:
        ranked = {}
        for layer, counts in table.counts.items():
            c = counts.float()
            prior = c.sum(0)
            ranked[layer] = (c + prior / (prior.sum() + 1)).argsort(dim=-1, descending=True).to(torch.int16)
        return cls(ranked)

    @property
    def layers(self) -> list[int]:
        return sorted(self.ranked)

    def to(self, device) -> DecoderGuess:
        return DecoderGuess({k: v.to(device) for k, v in self.ranked.items()})

    def predict(self, layer: int, prev: torch.Tensor, k: int) -> torch.Tensor:
        """[..., k] experts for decoder input tokens `prev` [...]; ids beyond the table use the top row's prior."""
        ranked = self.ranked[layer]
        return ranked[prev.clamp(0, ranked.shape[0] - 1), :k].long()

    def save(self, folder, fingerprint: str, info: dict) -> None:
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {f"layer{k}.ranked": v.contiguous() for k, v in self.ranked.items()},
            str(folder / self.FILE),
            metadata={"fingerprint": fingerprint, "info": json.dumps(info)},
        )

    @classmethod
    def load(cls, folder, fingerprint: str) -> DecoderGuess | None:
        """The guess shipped in a predictor folder, or None; one built for another model is an error."""
        from pathlib import Path

        from safetensors import safe_open

        path = Path(folder) / cls.FILE
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            ranked = {int(k.removeprefix("layer").split(".")[0]): f.get_tensor(k) for k in f.keys()}
        if meta.get("fingerprint") != fingerprint:
            from predictor.artifact import PredictorError

            raise PredictorError(
                f"{path}: decoder table was built for model {meta.get('fingerprint')}, this model is {fingerprint}"
            )
        return cls(ranked)


def guess_hit_rates(guess: DecoderGuess, routes, ks=(1, 3)) -> dict:
    """Per decoder layer: share of real decoder positions whose router choice is in the guess's top-k."""
    hits: dict = {}
    tokens: dict = {}
    for layer, prev, expert in routes:
        tokens[layer] = tokens.get(layer, 0) + expert.numel()
        ranked = guess.predict(layer, prev, max(ks))
        for k in ks:
            hits[(layer, k)] = hits.get((layer, k), 0) + int((ranked[:, :k] == expert[:, None]).any(-1).sum())
    return {
        str(layer): {"tokens": n, **{f"top{k}": round(hits[(layer, k)] / n, 4) for k in ks}}
        for layer, n in sorted(tokens.items())
    }
