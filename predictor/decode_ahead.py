"""The decode-step predictor: each MoE layer's experts for a generated token, from what is known one layer earlier,
trained offline on router traces of generated text (`sida predictor ahead`), shipped as `ahead.safetensors` in the
model's predictor folder and served by `offload/lookahead.py` in place of the next layer's own router.

Per MoE layer i, one small MLP (in → 256 → experts, multi-label) scores the experts from the embeddings of the token
the step reads and of the token before it, and the hidden state entering layer i−1's experts (for the first layer:
entering the last MoE layer's experts in the step before, zeros on a sequence's first decode step). Its top-k is the
guess. The alternative it replaces, the next layer's router applied ahead, is what `sida predictor ahead` measures
it against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sida.offload.lookahead import router_projection
from sida.offload.model_loader import LoadedModel
from sida.offload.runner import Runner
from sida.predictor.artifact import load_bound, save_bound
from sida.predictor.corpora import beginnings, read_c4_texts, read_wikitext_paragraphs

HIDDEN = 256


@dataclass
class DecodeRoutes:
    """Decode steps of generated text, per MoE layer: the hidden state entering its experts [N, H] and the router's
    top-k [N, k]; and the token each step read with the one before it [N, 2] (rows of every layer align)."""

    hidden: dict[int, torch.Tensor]
    experts: dict[int, torch.Tensor]
    tokens: torch.Tensor
    last_before: torch.Tensor  # [N, H] the hidden state entering the last MoE layer's experts in the step before

    def previous(self, layers: list[int], i: int) -> torch.Tensor:
        """What the scorer of `layers[i]` reads besides the tokens: layer i−1's experts input, or `last_before`."""
        return self.hidden[layers[i - 1]] if i else self.last_before


@torch.inference_mode()
def decode_routes(loaded: LoadedModel, prompts: list[str], tokens: int, batch: int = 16) -> DecodeRoutes:
    """Greedy generation of `tokens` tokens from each prompt on a resident model, recording every decode step's
    experts calls (the prompt's forward is left out)."""
    runner = Runner(loaded)
    layers = loaded.adapter.moe_layers(loaded.model)
    calls: dict[int, list] = {la.index: [] for la in layers}

    def record(index):
        return lambda _m, args: calls[index].append((args[0].float().clone(), args[1].clone()))

    handles = [la.experts[0].module.register_forward_pre_hook(record(la.index)) for la in layers]
    read = []
    try:
        for i in range(0, len(prompts), batch):
            enc = runner.encode(prompts[i : i + batch])
            width = enc["input_ids"].shape[1]
            for c in calls.values():
                c.append(None)  # the prompt's call comes next: marked, then dropped
            out = loaded.model.generate(
                **enc, max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=runner.pad_id
            )
            pairs = out[:, width - 1 : width + tokens - 1].unfold(1, 2, 1)  # [rows, steps, 2]: (before, read)
            read.append(pairs.transpose(0, 1).reshape(-1, 2))  # step-major, as the calls come
    finally:
        for h in handles:
            h.remove()
    hidden, experts = {}, {}
    for index, got in calls.items():
        steps = [c for j, c in enumerate(got) if c is not None and got[j - 1] is not None]  # not the prompt's
        hidden[index] = torch.cat([h for h, _ in steps])
        experts[index] = torch.cat([e for _, e in steps])
    last, before = calls[max(calls)], []
    for j, c in enumerate(last):
        if c is None or last[j - 1] is None:
            continue  # a batch's marker, or its prompt's call
        after_a_step = last[j - 2] is not None  # the call before this step's was a decode step, not the prompt's
        before.append(last[j - 1][0] if after_a_step else torch.zeros_like(c[0]))
    return DecodeRoutes(hidden, experts, torch.cat(read), torch.cat(before))


def recall(guess: torch.Tensor, actual: torch.Tensor) -> float:
    """The share of the router's choices [N, k] found among the guessed [N, k']."""
    return float((actual[:, :, None] == guess[:, None, :]).any(-1).float().mean())


class DecodeAhead(nn.Module):
    """The served scorer: `(layer, previous hidden [T, H] or None, token embeddings [T, 2H]) → logits [T, E]`; the
    embeddings are those of the token before and of the token the step reads."""

    FILE = "ahead.safetensors"

    def __init__(self, hidden_size: int, num_experts: int, layers: list[int]):
        super().__init__()
        self.first = min(layers)
        self.nets = nn.ModuleDict(
            {
                str(la): nn.Sequential(
                    nn.Linear(hidden_size * 3, HIDDEN),
                    nn.GELU(),
                    nn.Linear(HIDDEN, num_experts),
                )
                for la in layers
            }
        )
        self.hidden_size, self.num_experts = hidden_size, num_experts

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.nets)

    def features(self, layer: int, previous: torch.Tensor | None, token_emb: torch.Tensor) -> torch.Tensor:
        """[T, 3H]: the previous hidden state (zeros where there is none) and the two tokens' embeddings."""
        if previous is None:
            previous = token_emb.new_zeros(token_emb.shape[0], self.hidden_size)
        return torch.cat([previous.float(), token_emb.float()], dim=-1)

    def forward(self, layer: int, previous: torch.Tensor | None, token_emb: torch.Tensor) -> torch.Tensor:
        net = self.nets[str(layer)]
        with torch.inference_mode(not self.training):
            return net(self.features(layer, previous, token_emb))

    def save(self, folder, fingerprint: str, info: dict) -> None:
        """Write `ahead.safetensors` into the predictor folder, bound to the model's fingerprint."""
        meta = {"info": json.dumps(info), "hidden_size": str(self.hidden_size), "num_experts": str(self.num_experts)}
        save_bound(Path(folder) / self.FILE, self.state_dict(), fingerprint, meta)

    @classmethod
    def report(cls, folder) -> dict | None:
        """What was measured when the predictor in `folder` was built (its fit and held-out recall), or None."""
        path = Path(folder) / cls.FILE
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("info", "null"))

    @classmethod
    def load(cls, folder, fingerprint: str) -> DecodeAhead | None:
        """The predictor shipped in a predictor folder, or None; one built for another model is an error."""
        got = load_bound(Path(folder) / cls.FILE, fingerprint, "decode-step predictor")
        if got is None:
            return None
        state, meta = got
        layers = sorted({int(k.split(".")[1]) for k in state})
        net = cls(int(meta["hidden_size"]), int(meta["num_experts"]), layers)
        net.load_state_dict(state)
        return net.eval()


def fit(loaded: LoadedModel, train: DecodeRoutes, epochs: int = 400, lr: float = 2e-3, seed: int = 0) -> DecodeAhead:
    """Train every layer's MLP on `train` (full batch, Adam, binary cross-entropy on the router's top-k)."""
    torch.manual_seed(seed)
    emb = loaded.model.get_input_embeddings()
    layers = sorted(train.experts)
    num_experts = loaded.adapter.num_experts(loaded.model)
    net = DecodeAhead(emb.embedding_dim, num_experts, layers).train()
    with torch.inference_mode():
        token_emb = emb(train.tokens).flatten(1).float()  # [N, 2H]
    for i, layer in enumerate(layers):
        x = net.features(layer, train.previous(layers, i), token_emb).clone()
        target = torch.zeros(x.shape[0], num_experts).scatter_(1, train.experts[layer], 1.0)
        opt = torch.optim.Adam(net.nets[str(layer)].parameters(), lr=lr, weight_decay=1e-4)
        for _ in range(epochs):
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(net.nets[str(layer)](x), target)
            loss.backward()
            opt.step()
    return net.eval()


@torch.inference_mode()
def measure(loaded: LoadedModel, net: DecodeAhead | None, routes: DecodeRoutes) -> dict[str, float]:
    """Per-layer top-k recall on `routes`: of `net` (if given) and of the next layer's own router applied ahead."""
    emb = loaded.model.get_input_embeddings()
    layers = sorted(routes.experts)
    routers = {la.index: la.router for la in loaded.adapter.moe_layers(loaded.model)}
    k = routes.experts[layers[0]].shape[1]
    token_emb = emb(routes.tokens).flatten(1).float()  # [N, 2H]: the token before, the token read
    out = {}
    for i, layer in enumerate(layers):
        previous = routes.previous(layers, i)
        w, b = router_projection(routers[layer])
        x = (previous if i else token_emb[:, -emb.embedding_dim :]).to(w.dtype)
        ahead = nn.functional.linear(x, w, b).topk(k, -1).indices
        out[f"router_ahead.{layer}"] = round(recall(ahead, routes.experts[layer]), 4)
        if net is not None:
            guess = net(layer, previous, token_emb).topk(k, -1).indices
            out[f"trained.{layer}"] = round(recall(guess, routes.experts[layer]), 4)
    for name in ("router_ahead", "trained"):
        values = [v for key, v in out.items() if key.startswith(name + ".")]
        if values:
            out[name] = round(sum(values) / len(values), 4)
    return out


HELD_OUT = 64  # WikiText-2 valid paragraphs kept for measuring the decode-step predictor


def build(loaded: LoadedModel, data: Path, prompts: int = 300, tokens: int = 32) -> tuple[DecodeAhead, dict]:
    """Fit the decode-step predictor on greedy continuations of C4 document and WikiText-2 valid paragraph
    beginnings; measure it, and the routers applied ahead, on continuations of the first `HELD_OUT` WikiText-2 valid
    paragraphs, never fitted on. Returns it and its report."""
    c4 = read_c4_texts(data / "c4_sample" / "c4_sample.jsonl", prompts)
    wiki = read_wikitext_paragraphs(data / "wikitext2" / "wiki.valid.tokens", HELD_OUT + prompts)
    train_routes = decode_routes(loaded, beginnings(c4) + beginnings(wiki[HELD_OUT:]), tokens)
    net = fit(loaded, train_routes)
    heldout = measure(loaded, net, decode_routes(loaded, beginnings(wiki[:HELD_OUT]), tokens))
    info = {
        "fit": f"greedy continuations ({tokens} tokens) of the beginnings of {len(c4)} C4 documents and of "
        f"WikiText-2 valid paragraphs {HELD_OUT}..{len(wiki) - 1}: {len(train_routes.tokens)} decode steps",
        "heldout": f"WikiText-2 valid paragraphs 0..{HELD_OUT - 1}, never fitted on",
        "heldout_recall": heldout,
    }
    return net, info
