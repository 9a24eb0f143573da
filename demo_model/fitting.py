"""The training loop shared by the stages: AdamW, warm-up then linear decay, EMA weights chosen on held-out SST-2."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from sida.offload.adapters import SwitchAdapter

from .data import IGNORE, PAD_ID, Batch, Pair, Prepared, make_batches, pad
from .recipe import DemoRecipe

ExtraLoss = Callable[[Batch], torch.Tensor]  # a scalar added to the model's loss after each training forward
# Measures the model at an evaluation: adds its figures to the row, returns the score to maximise (None: the
# checkpoint may not be kept)
Evaluate = Callable[[nn.Module, dict], float | None]


@torch.no_grad()
def label_accuracy(model: nn.Module, pairs: list[Pair], label_ids: list[int], batch_size: int = 128) -> float:
    """Share of `pairs` whose gold label token wins the first decoder step's logits restricted to `label_ids`."""
    model.eval()
    correct = 0
    for i in range(0, len(pairs), batch_size):
        part = pairs[i : i + batch_size]
        inputs = pad([p[0] for p in part], PAD_ID)  # [batch, seq]
        start = SwitchAdapter().decoder_start_ids(model, len(part))  # [batch, 1]
        logits = model(input_ids=inputs, attention_mask=(inputs != PAD_ID).long(), decoder_input_ids=start).logits
        pred = logits[:, 0, label_ids].argmax(-1)  # [batch] index into label_ids
        gold = torch.tensor([label_ids.index(p[1][0]) for p in part])
        correct += int((pred == gold).sum())
    model.train()
    return correct / max(1, len(pairs))


@torch.no_grad()
def lm_loss(model: nn.Module, pairs: list[Pair], batch_size: int = 64) -> float:
    """Mean cross-entropy per target token of the (prefix, continuation) `pairs`, teacher-forced."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        part = pairs[i : i + batch_size]
        inputs, labels = pad([p[0] for p in part], PAD_ID), pad([p[1] for p in part], IGNORE)  # [batch, seq/target]
        logits = model(input_ids=inputs, attention_mask=(inputs != PAD_ID).long(), labels=labels).logits
        mask = labels != IGNORE
        total += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        tokens += int(mask.sum())
    model.train()
    return total / max(1, tokens)


def heldout_accuracy(model: nn.Module, prep: Prepared) -> float:
    """`label_accuracy` on the SST-2 train rows held out from training."""
    return label_accuracy(model, prep.heldout, prep.label_ids)


class Ema:
    """An exponential moving average of a model's parameters, which can stand in for them for a while."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.params = list(model.parameters())
        self.values = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current parameters."""
        torch._foreach_lerp_(self.values, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; its own weights come back after it."""
        live = [p.detach().clone() for p in self.params]
        _copy_into(self.params, self.values)
        try:
            yield
        finally:
            _copy_into(self.params, live)


@torch.no_grad()
def _copy_into(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms' scales or other vectors)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def warmup_linear_decay(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear rise over `warmup` steps, then linear decay to 0 at step `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def epoch_batches(prep: Prepared, batch_size: int) -> list[Batch]:
    """One epoch over every task's pairs: single-task batches, in random order across tasks."""
    batches = [b for task, pairs in prep.data.items() for b in make_batches(pairs, task, batch_size, prep.rng)]
    prep.rng.shuffle(batches)
    return batches


def train_step(model: nn.Module, opt, sched, batch: Batch, extra_loss: ExtraLoss | None):
    """One optimiser step on `batch` (gradients clipped to norm 1); returns the model's output."""
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, output_router_logits=True
    )
    loss = out.loss if extra_loss is None else out.loss + extra_loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return out


def fit(
    model: nn.Module,
    prep: Prepared,
    out_dir: Path,
    epochs: float,
    lr: float,
    warmup: int,
    recipe: DemoRecipe,
    log=print,
    desc: str = "demo-model",
    extra_loss: ExtraLoss | None = None,
    keep: str = "best",
    evaluate: Evaluate | None = None,
) -> dict:
    """Train `epochs` epochs; the EMA weights are evaluated on the held-out rows `recipe.evals_per_epoch` times an
    epoch and saved in `out_dir` when best so far (`keep="last"`: at every evaluation, so the last ones stay).

    `extra_loss(batch)`, if given, is added to the model's loss after each forward (it may read what forward hooks
    saw during that forward). `evaluate`, if given, scores each evaluation in place of the held-out accuracy.
    Returns {"best": row, "history": [row per evaluation], "steps", "minutes"}."""
    t0 = time.time()
    model.train()
    opt = make_optimizer(model, lr, recipe.weight_decay)
    steps_per_epoch = sum(math.ceil(len(v) / recipe.batch_size) for v in prep.data.values())
    total = int(steps_per_epoch * epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(warmup, total))
    ema = Ema(model, recipe.ema_decay)
    eval_every = max(1, min(total, steps_per_epoch // recipe.evals_per_epoch))
    best, best_score, history = {}, float("-inf"), []
    step = 0
    # a bar on a terminal; none in a CI log (disable=None: off where stderr is not a terminal), where the JSON
    # rows of each evaluation say how far it is
    bar = tqdm(total=total, desc=desc, file=sys.stderr, mininterval=5, disable=None)
    while step < total:
        for batch in epoch_batches(prep, recipe.batch_size)[: total - step]:
            out = train_step(model, opt, sched, batch, extra_loss)
            ema.update()
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(
                    loss=f"{out.loss.item():.3f}",
                    z=f"{float(out.encoder_z_loss):.2f}",
                    aux=f"{float(out.encoder_aux_loss):.2f}",
                )
            if step % eval_every == 0 or step == total:
                row = {"step": step, "epoch": round(step / steps_per_epoch, 2)}
                with ema.applied():
                    row["heldout_acc"] = heldout_accuracy(model, prep)
                    score = row["heldout_acc"] if evaluate is None else evaluate(model, row)
                    if keep == "last" or (score is not None and score > best_score):
                        best, best_score = row, score if score is not None else best_score
                        model.save_pretrained(out_dir, safe_serialization=True)
                row["minutes"] = round((time.time() - t0) / 60, 1)
                history.append(row)
                log(json.dumps(row))
    bar.close()
    return {"best": best, "history": history, "steps": total, "minutes": round((time.time() - t0) / 60, 1)}
