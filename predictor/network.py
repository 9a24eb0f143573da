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

    def attention_weights(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq, seq] sparse weights: each row sums to 1 over real tokens and is mostly zeros."""
        scores = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(x.shape[-1])  # [batch, seq, seq]
        scores = scores.masked_fill(~mask[:, None, :].bool(), -1e4)
        return self.sparsemax(scores)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Router-like logits [layers, batch, seq, experts]."""
        x = self.proj(self.embed(input_ids))  # [batch, seq, hidden]
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        x, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        x = self.norm(x + self.attention_weights(x, attention_mask) @ x)  # residual over the attended context
        return torch.stack([head(x) for head in self.heads])
