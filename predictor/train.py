"""Training the hash function on router traces (paper §3.5): λ·CE(router's choice) + truncated KD over the
router's top-T experts, AdamW, early stopping on a validation split, fixed seed, resumable from a checkpoint.

Only real tokens count, in the loss and in every hit rate.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sida.predictor.network import HashPredictor, PredictorArch
from sida.predictor.traces import TraceSet


@dataclass(frozen=True)
class TrainConfig:
    """Hash-function training settings (paper §3.5 where it gives them)."""

    hidden: int = 64  # LSTM width: wider costs latency for little hit rate on the demo model (README)
    lam: float = 0.005  # weight of the CE term (paper λ)
    top_t: int = 30  # truncated KD over the router's top-T (clipped to the number of experts)
    lr: float = 1e-3  # the paper's 5e-5 is for its scale; at this size 1e-3 converges (then decays linearly)
    weight_decay: float = 0.01
    batch_size: int = 64
    max_epochs: int = 20
    patience: int = 3  # evaluations without a better validation top-1 before stopping
    val_fraction: float = 0.1
    seed: int = 0


def tkd_loss(logits: torch.Tensor, top_idx: torch.Tensor, top_prob: torch.Tensor, top_t: int) -> torch.Tensor:
    """KL(router ‖ predictor) restricted to the router's top-T experts, both renormalised over that set.

    logits [tokens, E]; top_idx/top_prob [tokens, T'] (best first). Mean over tokens.
    """
    t = min(top_t, top_idx.shape[-1])
    p = top_prob[:, :t].float()
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-9)
    log_q = F.log_softmax(logits.gather(-1, top_idx[:, :t]), dim=-1)
    return (p * (p.clamp(min=1e-9).log() - log_q)).sum(-1).mean()


def loss_fn(pred: HashPredictor, batch: TraceSet, cfg: TrainConfig) -> torch.Tensor:
    """λ·CE(router top-1) + truncated KD, over the real tokens of every covered layer, averaged over layers."""
    logits = pred(batch.input_ids, batch.attention_mask)  # [layers, batch, seq, E]
    mask = batch.attention_mask.bool()
    total = logits.new_zeros(())
    for i, layer in enumerate(pred.arch.layers):
        lg = logits[i][mask]  # [real tokens, E]
        idx = batch.top_idx[layer][mask]
        prob = batch.top_prob[layer][mask]
        total = total + cfg.lam * F.cross_entropy(lg, idx[:, 0]) + tkd_loss(lg, idx, prob, cfg.top_t)
    return total / len(pred.arch.layers)


@torch.inference_mode()
def hit_rates(pred: HashPredictor, traces: TraceSet, ks=(1, 3), batch_size: int = 256) -> dict:
    """Share of real tokens whose router top-1 is among the predictor's top-k, per layer and overall."""
    was_training = pred.training
    pred.eval()
    hits = {(layer, k): 0 for layer in pred.arch.layers for k in ks}
    tokens = 0
    for start in range(0, len(traces), batch_size):
        batch = traces.subset(torch.arange(start, min(start + batch_size, len(traces))))
        logits = pred(batch.input_ids, batch.attention_mask)
        mask = batch.attention_mask.bool()
        tokens += int(mask.sum())
        for i, layer in enumerate(pred.arch.layers):
            truth = batch.top_idx[layer][..., 0][mask]
            ranked = logits[i][mask].topk(max(ks), dim=-1).indices
            for k in ks:
                hits[(layer, k)] += int((ranked[:, :k] == truth[:, None]).any(-1).sum())
    pred.train(was_training)
    out = {
        f"top{k}_hit_rate": sum(hits[(la, k)] for la in pred.arch.layers) / (tokens * len(pred.arch.layers)) for k in ks
    }
    out["per_layer"] = {str(la): {f"top{k}": hits[(la, k)] / tokens for k in ks} for la in pred.arch.layers}
    out["tokens"] = tokens
    return out


def _epoch_batches(traces: TraceSet, rows: torch.Tensor, batch_size: int, g: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches of trace rows: shuffled, length-sorted within chunks of 50 batches (far less padding
    for the LSTM), then the batches shuffled."""
    perm = rows[torch.randperm(len(rows), generator=g)]
    chunks = [perm[i : i + batch_size * 50] for i in range(0, len(perm), batch_size * 50)]
    batches = []
    for chunk in chunks:
        chunk = chunk[traces.attention_mask[chunk].sum(1).argsort()]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def _resume(ckpt: Path, run: str, pred, opt, state: dict, best_weights: dict, log) -> tuple[dict, dict]:
    """(state, best weights) from a checkpoint of the same run (settings, traces, model), else those given."""
    saved = torch.load(ckpt, weights_only=True)
    if saved.get("run") != run:
        log(f"{ckpt} is from another run (settings, traces or model differ): starting afresh")
        return state, best_weights
    pred.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    state = json.loads(saved["state"])
    log(f"resumed from {ckpt} at epoch {state['epoch']}")
    return state, saved["best"]


def _run_key(traces: TraceSet, cfg: TrainConfig) -> str:
    """What a checkpoint must match to be resumed: the same settings on the same traces of the same model."""
    summary = {
        "config": asdict(cfg),
        "fingerprint": traces.fingerprint,
        "rows": len(traces),
        "tokens": int(traces.attention_mask.sum()),
        "ids": int(traces.input_ids.sum()),
    }
    return json.dumps(summary, sort_keys=True)


def _train_epoch(pred: HashPredictor, opt, traces: TraceSet, batches: list[torch.Tensor], cfg: TrainConfig, epoch: int):
    """One pass over `batches` (rows of `traces`), one optimizer step each; a progress bar on a terminal (none in a
    CI log, where each epoch's validation line says how far training is)."""
    desc = f"epoch {epoch + 1}/{cfg.max_epochs}"
    bar = tqdm(batches, desc=desc, unit="batch", file=sys.stderr, disable=None, leave=False, mininterval=1)
    for n, rows in enumerate(bar):
        loss = loss_fn(pred, traces.subset(rows), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pred.parameters(), 1.0)
        opt.step()
        if n % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")


def _validate(pred: HashPredictor, val: TraceSet, state: dict, best_weights: dict, t0: float, log) -> dict:
    """Score the finished epoch on `val`, log it and update the early-stopping `state`; the best weights so far."""
    rates = hit_rates(pred, val)
    row = {"epoch": state["epoch"], "val_top1": rates["top1_hit_rate"], "val_top3": rates["top3_hit_rate"]}
    row["minutes"] = round((time.time() - t0) / 60, 2)
    state["history"].append(row)
    log(json.dumps(row))
    if rates["top1_hit_rate"] > state["best"]:
        state["best"], state["bad"] = rates["top1_hit_rate"], 0
        return {k: v.clone() for k, v in pred.state_dict().items()}
    state["bad"] += 1
    return best_weights


def _save_checkpoint(ckpt: Path, run: str, pred: HashPredictor, opt, state: dict, best_weights: dict) -> None:
    """Everything `_resume` needs to continue this run after the last finished epoch."""
    saved = {"model": pred.state_dict(), "opt": opt.state_dict(), "best": best_weights}
    torch.save({**saved, "state": json.dumps(state), "run": run}, ckpt)


def train(
    traces: TraceSet, embeddings: torch.Tensor, num_experts: int, cfg: TrainConfig, ckpt: Path | None = None, log=print
) -> tuple[HashPredictor, dict]:
    """Train a hash function on `traces` (a validation split held out), early-stopped on its top-1 hit rate;
    returns the best predictor and a report. `embeddings` [vocab, d_model] are the model's, kept frozen."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(traces), generator=g)
    n_val = max(1, int(len(traces) * cfg.val_fraction))
    val, train_rows = traces.subset(order[:n_val]), order[n_val:]
    arch = PredictorArch(embeddings.shape[0], embeddings.shape[1], num_experts, tuple(traces.layers), cfg.hidden)
    pred = HashPredictor(arch)
    pred.embed.weight.data.copy_(embeddings)
    opt = torch.optim.AdamW([p for p in pred.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "best": -1.0, "bad": 0, "history": []}
    run = _run_key(traces, cfg)
    best_weights = {k: v.clone() for k, v in pred.state_dict().items()}
    if ckpt is not None and ckpt.is_file():
        state, best_weights = _resume(ckpt, run, pred, opt, state, best_weights, log)
    t0 = time.time()
    while state["epoch"] < cfg.max_epochs and state["bad"] < cfg.patience:
        # linear decay to 5% of lr over max_epochs, set per epoch (so a resumed run continues the same schedule)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * (1 - 0.95 * state["epoch"] / cfg.max_epochs)
        _train_epoch(pred, opt, traces, _epoch_batches(traces, train_rows, cfg.batch_size, g), cfg, state["epoch"])
        state["epoch"] += 1
        best_weights = _validate(pred, val, state, best_weights, t0, log)
        if ckpt is not None:
            _save_checkpoint(ckpt, run, pred, opt, state, best_weights)
    pred.load_state_dict(best_weights)
    pred.eval()
    report = {"config": asdict(cfg), "history": state["history"], "val": hit_rates(pred, val), "rows": len(traces)}
    return pred, report
