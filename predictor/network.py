"""The hash function (paper §3.4): frozen token embeddings → Linear → 2-layer LSTM → sparsemax attention
over the sequence → residual → one head per predicted MoE layer.

The encoder's whole input is known before inference, so the LSTM is bidirectional. A head's softmax is
trained (truncated KD) towards the router's distribution, so its top-1 probability serves as α.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from sparsemax import Sparsemax
from torch import nn


@dataclass(frozen=True)
class PredictorArch:
    vocab_size: int
    d_embed: int
    num_experts: int
    layers: tuple[int, ...]  # MoE layer indices this predictor covers (one head each)
    hidden: int = 256
    lstm_layers: int = 2
    bidirectional: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PredictorArch:
        return cls(**{**d, "layers": tuple(d["layers"])})


class HashPredictor(nn.Module):
    def __init__(self, arch: PredictorArch):
        super().__init__()
        self.arch = arch
        h = arch.hidden
        self.embed = nn.Embedding(arch.vocab_size, arch.d_embed)
        self.embed.weight.requires_grad_(False)  # the model's own embeddings, frozen
        self.proj = nn.Linear(arch.d_embed, h)
        directions = 2 if arch.bidirectional else 1
        self.lstm = nn.LSTM(h, h // directions, arch.lstm_layers, batch_first=True, bidirectional=arch.bidirectional)
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.sparsemax = Sparsemax(dim=-1)
        self.norm = nn.LayerNorm(h)
        self.heads = nn.ModuleList(nn.Linear(h, arch.num_experts) for _ in arch.layers)
        self._directions: list | None = None  # see _by_direction

    def _by_direction(self) -> list[list[nn.LSTM]]:
        """Per LSTM layer, its forward (and reverse) direction as single-direction LSTMs that share `self.lstm`'s
        parameters (not submodules: the state dict keeps one copy). On right-padded batches they compute what the
        packed bidirectional LSTM computes, without packing, which costs more than the LSTM itself on CPU."""
        if self._directions is None:
            lstm, dirs = self.lstm, []
            width = lstm.hidden_size * (2 if lstm.bidirectional else 1)
            for layer in range(lstm.num_layers):
                pair = []
                for suffix in ("", "_reverse") if lstm.bidirectional else ("",):
                    one = nn.LSTM(lstm.input_size if layer == 0 else width, lstm.hidden_size, 1, batch_first=True)
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        setattr(one, f"{name}_l0", getattr(lstm, f"{name}_l{layer}{suffix}"))
                    pair.append(one)
                dirs.append(pair)
            self._directions = dirs
        return self._directions

    def encode(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The bidirectional LSTM over right-padded `x` [batch, seq, hidden]; padded positions come out as zeros."""
        seq = x.shape[1]
        lengths = attention_mask.sum(1, keepdim=True)  # [batch, 1]
        t = torch.arange(seq, device=x.device)
        rev = torch.where(t < lengths, lengths - 1 - t, t)[..., None]  # reverses each row's real tokens only
        for directions in self._by_direction():
            outs = [directions[0](x)[0]]  # forward: the padding comes after every real token, so never reaches it
            if len(directions) == 2:
                y = directions[1](x.gather(1, rev.expand(-1, -1, x.shape[-1])))[0]
                outs.append(y.gather(1, rev.expand(-1, -1, y.shape[-1])))
            x = torch.cat(outs, dim=-1)
        return x * attention_mask[..., None].to(x.dtype)

    def attention_weights(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq, seq] sparse weights: each row sums to 1 over real tokens and is mostly zeros."""
        scores = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(x.shape[-1])  # [batch, seq, seq]
        scores = scores.masked_fill(~mask[:, None, :].bool(), -1e4)
        if torch.is_grad_enabled():
            return self.sparsemax(scores)
        return sparsemax_small_support(scores, self.sparsemax)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Router-like logits [layers, batch, seq, experts]."""
        x = self.encode(self.proj(self.embed(input_ids)), attention_mask)  # [batch, seq, hidden]
        x = self.norm(x + self.attention_weights(x, attention_mask) @ x)  # residual over the attended context
        weight = torch.cat([head.weight for head in self.heads])  # all heads as one matmul
        bias = torch.cat([head.bias for head in self.heads])
        logits = nn.functional.linear(x, weight, bias)  # [batch, seq, layers * experts]
        return logits.unflatten(-1, (len(self.heads), -1)).permute(2, 0, 1, 3)


def sparsemax_small_support(scores: torch.Tensor, full: Sparsemax, k: int = 24) -> torch.Tensor:
    """Sparsemax over the last dim from each row's top-k scores only (no gradient), the same numbers as `full`.

    Sparsemax keeps the j largest scores where j is the last index with 1 + j·z₍ⱼ₎ > z₍₁₎ + … + z₍ⱼ₎ (z sorted
    descending, and the condition holds for a prefix of j). If it fails within the top k, that is the support;
    rows whose support fills all k go through `full` (the sparsemax package). A full sort of every row costs
    more than the rest of the predictor's attention on CPU."""
    if scores.shape[-1] <= k:
        return full(scores)
    top = scores.topk(k, dim=-1).values
    cums = top.cumsum(-1) - 1
    j = torch.arange(1, k + 1, device=scores.device, dtype=scores.dtype)
    support = (j * top > cums).sum(-1, keepdim=True)  # ≥ 1 always
    tau = cums.gather(-1, support - 1) / support
    out = (scores - tau).clamp(min=0)
    wide = support[..., 0] == k
    if wide.any():
        out[wide] = full(scores[wide])
    return out
