"""The hash function (paper §3.4): frozen token embeddings → Linear → 2-layer LSTM → sparsemax attention
over the sequence → residual → one head per predicted MoE layer; `PredictorHash` turns its output into a batch's
hash table.

The encoder's whole input is known before inference, so the LSTM is bidirectional. A head's softmax is
trained (truncated KD) towards the router's distribution, so its top-1 probability serves as α.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
from sparsemax import Sparsemax
from torch import nn

from sida.offload.hash_table import HashTable


@dataclass(frozen=True)
class PredictorArch:
    """The hash network's shape: vocabulary and embedding width, experts, covered MoE layers, LSTM size."""

    vocab_size: int
    d_embed: int
    num_experts: int
    layers: tuple[int, ...]  # MoE layer indices this predictor covers (one head each)
    hidden: int = 256
    lstm_layers: int = 2
    bidirectional: bool = True

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (what `predictor.json` stores under "arch")."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PredictorArch:
        """The architecture stored by `to_dict` (JSON lists back to tuples)."""
        return cls(**{**d, "layers": tuple(d["layers"])})


class HashPredictor(nn.Module):
    """Token ids [batch, seq] → router-like logits [layers, batch, seq, experts] for every covered MoE layer."""

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
        self._folded: tuple | None = None  # see _inference_form

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
        """The bidirectional LSTM over right-padded `x` [batch, seq, hidden] with `attention_mask` [batch, seq];
        returns [batch, seq, hidden], padded positions as zeros."""
        seq = x.shape[1]
        lengths = attention_mask.sum(1, keepdim=True)  # [batch, 1]
        t = torch.arange(seq, device=x.device)
        rev = torch.where(t < lengths, lengths - 1 - t, t)[..., None]  # reverses each row's real tokens only
        with nullcontext() if torch.is_grad_enabled() else torch_threads(1):
            for directions in self._by_direction():
                outs = [directions[0](x)[0]]  # forward: the padding comes after every real token, never reaches it
                if len(directions) == 2:
                    y = directions[1](x.gather(1, rev.expand(-1, -1, x.shape[-1])))[0]
                    outs.append(y.gather(1, rev.expand(-1, -1, y.shape[-1])))
                x = torch.cat(outs, dim=-1)
        return x * attention_mask[..., None].to(x.dtype)

    def attention_weights(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of `x` [batch, seq, hidden] over itself: [batch, seq, seq] sparse weights, each row summing
        to 1 over the real tokens of `mask` [batch, seq] and mostly zeros."""
        if torch.is_grad_enabled():
            scores = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(x.shape[-1])  # [batch, seq, seq]
            return self.sparsemax(scores.masked_fill(~mask[:, None, :].bool(), -1e4))
        _, _, qk_weight, qk_bias = self._inference_form()
        scores = nn.functional.linear(x, qk_weight, qk_bias) @ x.transpose(1, 2)
        return sparsemax_small_support(scores.masked_fill(~mask[:, None, :].bool(), -1e4), self.sparsemax)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask [batch, seq] → router-like logits [layers, batch, seq, experts]."""
        if torch.is_grad_enabled():
            x = self.proj(self.embed(input_ids))
        else:
            x = nn.functional.embedding(input_ids, self._inference_form()[1])
        x = self.encode(x, attention_mask)  # [batch, seq, hidden]
        x = self.norm(x + self.attention_weights(x, attention_mask) @ x)  # residual over the attended context
        weight = torch.cat([head.weight for head in self.heads])  # all heads as one matmul
        bias = torch.cat([head.bias for head in self.heads])
        logits = nn.functional.linear(x, weight, bias)  # [batch, seq, layers * experts]
        return logits.unflatten(-1, (len(self.heads), -1)).permute(2, 0, 1, 3)

    @torch.no_grad()
    def _inference_form(self) -> tuple:
        """Weights folded for forwards without gradient, rebuilt whenever a parameter they come from changed in
        place (an optimizer step, load_state_dict): (versions, the embedding table already through `proj`
        [vocab, hidden], and query·key as one linear map).

        With q = x Wqᵀ + bq and k = x Wkᵀ + bk, q_i·k_j = (x_i WqᵀWk + bq Wk)·x_j + terms that depend on i only;
        sparsemax is unchanged by adding a constant to a row, so those terms are dropped: two matmuls fewer
        per forward."""
        sources = (
            self.embed.weight,
            self.proj.weight,
            self.proj.bias,
            *self.query.parameters(),
            *self.key.parameters(),
        )
        versions = tuple(p._version for p in sources)
        if self._folded is None or self._folded[0] != versions:
            scale = 1 / math.sqrt(self.arch.hidden)
            table = self.proj(self.embed.weight)
            qk_weight = self.key.weight.T @ self.query.weight * scale  # y = x Wᵀ + b with W = (WqᵀWk)ᵀ
            qk_bias = self.query.bias @ self.key.weight * scale
            self._folded = (versions, table, qk_weight, qk_bias)
        return self._folded


@contextmanager
def torch_threads(n: int):
    """Run the block with `n` torch intra-op threads (a per-OS-thread setting), then restore the count.

    The predictor's LSTM steps are too small to gain from splitting across threads, while its attention and
    heads still do, so only the LSTM runs on one thread."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sparsemax_small_support(scores: torch.Tensor, full: Sparsemax, ks: tuple[int, ...] = (12, 24)) -> torch.Tensor:
    """Sparsemax over the last dim of `scores` [..., n] from each row's top-k only (no gradient): the same
    numbers as `full`, same shape.

    Sparsemax keeps the j largest scores where j is the last index with 1 + j·z₍ⱼ₎ > z₍₁₎ + … + z₍ⱼ₎ (z sorted
    descending, and the condition holds for a prefix of j). If it fails within the top k, that is the support;
    rows whose support fills all k are redone with the next k of `ks`, and after the last through `full` (the
    sparsemax package). A full sort of every row costs more than the rest of the predictor's attention on CPU,
    and a trained predictor's attention rows keep few scores, so most rows need only the first top-k."""
    k, *wider = ks
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
        out[wide] = sparsemax_small_support(scores[wide], full, tuple(wider)) if wider else full(scores[wide])
    return out


class PredictorHash:
    """The runner's `HashFunction` (offload/contracts.py) from a trained predictor: input_ids and attention_mask
    [batch, seq] → HashTable of the MoE layers it was trained for (top-k experts [batch, seq, k], their
    probabilities, and α [batch, seq] per layer): a Switch model's encoder layers (its decoder layers are routed
    by the router), every layer of a decoder-only model over the prompt's tokens."""

    def __init__(self, pred: HashPredictor, k: int = 3):
        self.pred = pred
        self.k = min(k, pred.arch.num_experts)

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask, decoder_input_ids=None) -> HashTable:
        """The HashTable of one batch; `decoder_input_ids` is accepted for the runner's signature and unused. A
        decoder-only model's left-padded rows are read right-padded (the network's LSTM wants the padding last)
        and their predictions put back in place."""
        lead = (attention_mask.cumsum(1) == 0).sum(1, keepdim=True)  # [batch, 1] leading padding per row
        if not lead.any():
            logits = self.pred(input_ids, attention_mask)  # [layers, batch, seq, E]
        else:
            t = torch.arange(input_ids.shape[1], device=input_ids.device)
            right = (t + lead) % input_ids.shape[1]  # [batch, seq] position j reads position j + lead
            logits = self.pred(input_ids.gather(1, right), attention_mask.gather(1, right))
            back = ((t - lead) % input_ids.shape[1])[None, :, :, None].expand_as(logits)
            logits = logits.gather(2, back)
        probs = logits.float().softmax(-1)
        top = probs.topk(self.k, dim=-1)
        experts = {layer: top.indices[i] for i, layer in enumerate(self.pred.arch.layers)}
        alphas = {layer: top.values[i][..., 0] for i, layer in enumerate(self.pred.arch.layers)}
        probs = {layer: top.values[i] for i, layer in enumerate(self.pred.arch.layers)}
        return HashTable(experts, alphas, probs)
