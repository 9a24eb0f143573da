"""The training stages of the demo model; each writes its best (or last) checkpoint into `out_dir`.

1. `train`: tokenizer and model from scratch on SST-2, MRPC and the C4 prefix-LM, mixed batch by batch.
2. `revive`: split busy decoder experts into the idle ones, then a short fine-tune.
3. `consistent`: fine-tune the encoder routers towards one expert per token id (see encoder_routing).
4. `respread`: split again the decoder experts stage 3 left idle, without a fine-tune.
5. `lm` (only when asked for): the decoder and the shared embedding learn to continue text; encoder blocks frozen.
Checkpoints are chosen on a held-out slice of SST-2 *train*, never on dev.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .data import Batch, Prepared, prepare, prepare_lm
from .decoder_experts import decoder_usage, experts_used, split_dead_experts, split_idle_decoder_experts
from .encoder_routing import TokenAssignment, encoder_layers, router_confidence, token_routing, training_router_logits
from .fitting import ExtraLoss, fit, heldout_accuracy, lm_loss
from .recipe import DemoRecipe, load_checkpoint, make_config, new_model
from .tokenizer import load_tokenizer, save_tokenizer


def train(data_dir: Path, out_dir: Path, recipe: DemoRecipe, log=print) -> dict:
    """Stage 1: tokenizer and model from scratch."""
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    prep = prepare(data_dir, recipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(prep.tok, out_dir, model_max_length=512)
    log(f"tokenizer: {prep.tok.get_vocab_size()} tokens ({time.time() - t0:.0f}s)")
    log("examples: " + ", ".join(f"{k} {len(v)}" for k, v in prep.data.items()))
    model = new_model(make_config(recipe, prep.tok.get_vocab_size()), recipe.router_init_std)
    return fit(model, prep, out_dir, recipe.epochs, recipe.lr, recipe.warmup_steps, recipe, log)


def _reload(data_dir: Path, out_dir: Path, recipe: DemoRecipe) -> tuple[Prepared, nn.Module]:
    """The training data encoded with the tokenizer in `out_dir`, and the model saved there."""
    return prepare(data_dir, recipe, load_tokenizer(out_dir)), load_checkpoint(out_dir)


def revive(data_dir: Path, out_dir: Path, recipe: DemoRecipe, log=print) -> dict:
    """Stage 2: decoder experts that stage 1 left idle get a copy of a busy expert, then a short fine-tune, and
    the experts the fine-tune leaves idle are split again."""
    torch.manual_seed(recipe.seed + 1)
    prep, model = _reload(data_dir, out_dir, recipe)
    before = decoder_usage(model, prep)
    split = split_dead_experts(model, before)
    used = experts_used(before)
    log(json.dumps({"decoder_experts_used_before": used, "split": split}))
    report = fit(model, prep, out_dir, recipe.revive_epochs, recipe.revive_lr, 100, recipe, log, desc="revive")
    model = load_checkpoint(out_dir)
    split_again, after = split_idle_decoder_experts(model, prep, out_dir, seed=recipe.seed + 1)
    if split_again:
        report["split_after_finetune"] = split_again
    report["decoder_experts_used"] = {"before": used, "after": after}
    report["heldout_acc_final"] = heldout_accuracy(model, prep)
    log(json.dumps(report["decoder_experts_used"]))
    return report


def consistent(data_dir: Path, out_dir: Path, recipe: DemoRecipe, log=print) -> dict:
    """Stage 3: one `consistent_round` per entry of `recipe.consistent_weights`, each on the previous one's model."""
    rounds = [consistent_round(data_dir, out_dir, recipe, w, log) for w in recipe.consistent_weights]
    report = dict(rounds[-1])
    report["rounds"] = rounds
    return report


def consistent_round(data_dir: Path, out_dir: Path, recipe: DemoRecipe, weight: float, log=print) -> dict:
    """Make each encoder MoE layer route a token id to one expert whatever its context (one epoch).

    The model's own routing is counted on training inputs, each token id is assigned the expert of its highest
    mean router logit (shifted per expert so that none holds over `consistent_slack` / E of the occurrences, see
    `balanced_assignment`), and the model is fine-tuned with its task loss + `weight` × the routers' cross-entropy
    against that assignment (real tokens only) + the usual load-balancing loss; the assignment follows the moving
    routing (`consistent_refresh`). The router still chooses from the hidden state at inference; how often it
    agrees with the assignment is reported.
    Decoder layers are not constrained here; `respread` revives the decoder experts they let fall idle."""
    torch.manual_seed(recipe.seed + 3)  # every round from the same seed, whatever ran before it
    prep, model = _reload(data_dir, out_dir, recipe)
    layers = encoder_layers(model)
    before = router_confidence(model, prep, layers)
    assignment = TokenAssignment.count(model, prep, layers, recipe.consistent_sequences, recipe.consistent_slack)
    seeded = assignment.majority_agreement()
    log(json.dumps({"router_confidence_before": before, "token_majority_agreement_before": seeded}))
    with training_router_logits(layers) as routed:
        loss = _router_loss(model, prep, recipe, weight, assignment, routed)
        # A short EMA horizon and the last weights: a longer average would blend the routers back towards stage 2's.
        short = replace(recipe, ema_decay=0.995)
        desc = f"consistent {weight}"
        report = fit(model, prep, out_dir, 1.0, recipe.consistent_lr, 100, short, log, desc, loss, keep="last")
    model = load_checkpoint(out_dir)
    layers = encoder_layers(model)
    after = {b: c for b, (c, _) in token_routing(model, prep, layers, recipe.consistent_sequences).items()}
    report["router_confidence"] = {"before": before, "after": router_confidence(model, prep, layers)}
    report["agreement_with_assignment"] = assignment.agreement(after)
    log(json.dumps({k: report[k] for k in ("router_confidence", "agreement_with_assignment")}))
    return report


def _router_loss(
    model: nn.Module,
    prep: Prepared,
    recipe: DemoRecipe,
    weight: float,
    assignment: TokenAssignment,
    routed: list[tuple[int, torch.Tensor]],
) -> ExtraLoss:
    """fit()'s extra loss for a consistent round: `weight` × the routers' cross-entropy against the assignment,
    on the router logits `routed` collected during the forward; every `consistent_refresh` steps the routing
    is re-counted (on a quarter of `consistent_sequences`) so that the assignment follows the moving model."""
    layers = encoder_layers(model)
    steps = 0

    def loss(b: Batch) -> torch.Tensor:
        nonlocal steps
        steps += 1
        if steps % recipe.consistent_refresh == 0:
            assignment.recount(model, prep, layers, recipe.consistent_sequences // 4)
        value = assignment.cross_entropy(routed, b.input_ids, b.attention_mask)
        routed.clear()
        return weight * value

    return loss


def respread(data_dir: Path, out_dir: Path, recipe: DemoRecipe, log=print) -> dict:
    """Stage 4: split busy decoder experts into those stage 3 let fall idle (its router loss is on the encoder;
    the decoder's routers drift with the task loss), without a fine-tune: a split expert is a copy of its donor
    and the two router rows stay close, so the model computes almost what it did, and the encoder is untouched."""
    prep, model = _reload(data_dir, out_dir, recipe)
    usage = decoder_usage(model, prep)
    acc_before = heldout_accuracy(model, prep)
    split, after = split_idle_decoder_experts(model, prep, out_dir, seed=recipe.seed + 4, usage=usage)
    report = {
        "split": split,
        "decoder_experts_used": {"before": experts_used(usage), "after": after},
        "heldout_acc": {"before": acc_before, "after": heldout_accuracy(model, prep)},
    }
    report["best"] = {"heldout_acc": report["heldout_acc"]["after"]}
    log(json.dumps(report))
    return report


def lm(data_dir: Path, out_dir: Path, recipe: DemoRecipe, log=print) -> dict:
    """Stage 5: stages 1-4 give the prefix-LM a few hundred steps, and it stays at about the tokens' unigram
    frequencies. The decoder and the shared embedding (which is also the output layer) are fine-tuned on
    `prepare_lm`'s data with the encoder's blocks frozen; the checkpoint with the lowest held-out C4 loss whose
    held-out accuracy is within `lm_acc_drop` of the start is kept. Decoder experts left idle are split after.
    The encoder reads the moved embedding, so its routing moves a little: the predictor must be retrained."""
    torch.manual_seed(recipe.seed + 5)
    prep, model = _reload(data_dir, out_dir, recipe)
    prep, heldout = prepare_lm(prep, data_dir, recipe)
    for p in [*model.encoder.block.parameters(), *model.encoder.final_layer_norm.parameters()]:
        p.requires_grad_(False)
    start = {"heldout_acc": heldout_accuracy(model, prep), "heldout_lm_loss": lm_loss(model, heldout)}
    floor = start["heldout_acc"] - recipe.lm_acc_drop
    log(json.dumps({"start": start, "lm_pairs": len(prep.data["c4_lm"]), "heldout_pairs": len(heldout)}))

    def evaluate(m: nn.Module, row: dict) -> float | None:
        row["heldout_lm_loss"] = round(lm_loss(m, heldout), 4)
        return -row["heldout_lm_loss"] if row["heldout_acc"] >= floor else None

    report = fit(model, prep, out_dir, recipe.lm_epochs, recipe.lm_lr, 200, recipe, log, "lm", evaluate=evaluate)
    report["start"], report["pairs"] = start, {task: len(pairs) for task, pairs in prep.data.items()}
    model = load_checkpoint(out_dir)
    split, after = split_idle_decoder_experts(model, prep, out_dir, seed=recipe.seed + 5)
    report["split"], report["decoder_experts_used"] = split, after
    report["final"] = {"heldout_acc": heldout_accuracy(model, prep), "heldout_lm_loss": lm_loss(model, heldout)}
    log(json.dumps({k: report[k] for k in ("start", "best", "final", "decoder_experts_used")}))
    return report
