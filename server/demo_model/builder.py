"""Builds the embedded demo model: a word-level BPE tokenizer and a small Switch encoder-decoder trained here.

Tasks (text-to-text, mixed batch by batch): SST-2 and MRPC classification with single-token label words,
and a prefix-LM completion objective on the C4 sample so that decoder MoE layers see multi-token targets
and `sida complete` has something to say. Checkpoints are chosen on a held-out slice of SST-2 *train*,
never on dev. Pitfalls handled here are listed in ../shared/docs/DEMO-MODEL-NOTES.md.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

from sida.offload.datasets import LABEL_WORDS, TASKS, read_c4_texts

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


@dataclass(frozen=True)
class DemoRecipe:
    vocab_size: int = 8000
    d_model: int = 128
    d_ff: int = 512
    num_heads: int = 4
    d_kv: int = 32
    num_layers: int = 4
    num_sparse_layers: int = 2  # per stack: blocks 1 and 3 of 4
    num_experts: int = 16
    expert_capacity: int = 256
    max_input_tokens: int = 128
    router_init_std: float = 0.02  # the library's std 1.0 makes small routers collapse
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    dropout: float = 0.1
    lr: float = 4e-4
    warmup_steps: int = 300
    weight_decay: float = 0.01
    batch_size: int = 64
    epochs: int = 6
    ema_decay: float = 0.999
    heldout: int = 1000  # SST-2 train rows held out for checkpoint choice
    lm_prefix: tuple[int, int] = (16, 64)
    lm_target: int = 32
    evals_per_epoch: int = 2
    revive_epochs: float = 0.5  # stage 2: fine-tune after splitting unused decoder experts
    revive_lr: float = 1e-4
    sharpen_epochs: float = 1.0  # experiment: make encoder routers decisive by an entropy penalty (not shipped)
    sharpen_lr: float = 1e-4
    sharpen_entropy: float = 0.05  # coefficient of the mean router entropy of real encoder tokens
    sharpen_aux_loss_coef: float = 0.01
    # stage 3: each token routed to one expert per encoder layer, whatever its context; one epoch per round, each
    # round's coefficient of the routers' cross-entropy against the token's assigned expert
    consistent_weights: tuple[float, ...] = (0.3, 1.0, 2.0)
    consistent_lr: float = 2e-4
    consistent_slack: float = 1.3  # an expert's share of token occurrences in the assignment: at most slack / E
    consistent_sequences: int = 20000  # sequences whose routing is counted to seed the assignment
    consistent_refresh: int = 150  # steps between re-counts of the routing (on a quarter as many sequences)
    seed: int = 0


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Word-level BPE: lower-cased, split on whitespace and punctuation (apostrophes stay in words, like PTB's 's)."""
    tok = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\s']"), behavior="isolated")]
    )
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK],
        end_of_word_suffix="</w>",
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Label words must be one token each: their first-step logits are the classifier.
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in LABEL_WORDS])
    tok.post_processor = TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return tok


def save_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=model_max_length
    )
    fast.save_pretrained(out)


def make_config(recipe: DemoRecipe, vocab_size: int):
    from transformers import SwitchTransformersConfig

    config = SwitchTransformersConfig(
        vocab_size=vocab_size,
        d_model=recipe.d_model,
        d_ff=recipe.d_ff,
        d_kv=recipe.d_kv,
        num_heads=recipe.num_heads,
        num_layers=recipe.num_layers,
        num_decoder_layers=recipe.num_layers,
        num_sparse_encoder_layers=recipe.num_sparse_layers,
        num_sparse_decoder_layers=recipe.num_sparse_layers,
        num_experts=recipe.num_experts,
        expert_capacity=recipe.expert_capacity,
        router_aux_loss_coef=recipe.router_aux_loss_coef,
        router_z_loss_coef=recipe.router_z_loss_coef,
        dropout_rate=recipe.dropout,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=True,
    )
    config.sida_labels = {name: list(task.labels) for name, task in TASKS.items()}
    return config


def new_model(config, router_init_std: float):
    from transformers import SwitchTransformersForConditionalGeneration

    model = SwitchTransformersForConditionalGeneration(config)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "SwitchTransformersTop1Router":
                module.classifier.weight.normal_(0.0, router_init_std)
    return model


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Batch:
    task: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def make_batches(pairs: list[tuple[list[int], list[int]]], task: str, size: int, rng: random.Random) -> list[Batch]:
    """Shuffle, then sort by length inside windows of 50 batches: little padding, still random."""
    pairs = pairs[:]
    rng.shuffle(pairs)
    batches = []
    window = size * 50
    for start in range(0, len(pairs), window):
        chunk = sorted(pairs[start : start + window], key=lambda p: len(p[0]))
        for i in range(0, len(chunk), size):
            part = chunk[i : i + size]
            inputs = _pad([p[0] for p in part], 0)
            batches.append(Batch(task, inputs, (inputs != 0).long(), _pad([p[1] for p in part], -100)))
    return batches


def encode_examples(tok: Tokenizer, examples, max_len: int) -> list[tuple[list[int], list[int]]]:
    enc_in = tok.encode_batch([e.prompt for e in examples])
    out = []
    for e, x in zip(examples, enc_in):
        ids = x.ids[: max_len - 1] + [1] if len(x.ids) > max_len else x.ids
        out.append((ids, [tok.token_to_id(e.label), 1]))
    return out


def lm_pairs(tok: Tokenizer, texts: list[str], recipe: DemoRecipe, rng: random.Random):
    """Prefix-LM: a random-length prefix of a document window → the next `lm_target` tokens."""
    pairs = []
    lo, hi = recipe.lm_prefix
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids
        pos = 0
        while pos + lo + recipe.lm_target <= len(ids):
            n = rng.randint(lo, hi)
            prefix = ids[pos : pos + n]
            target = ids[pos + n : pos + n + recipe.lm_target]
            if len(target) < 4:
                break
            pairs.append((prefix + [1], target))
            pos += n + len(target)
    return pairs


# ---------------------------------------------------------------------------------------------- train


@torch.no_grad()
def label_accuracy(model, tok: Tokenizer, pairs, label_ids: list[int], batch_size: int = 128) -> float:
    """First-decoder-step logits restricted to the task's label tokens; the argmax is the prediction."""
    model.eval()
    correct = 0
    for i in range(0, len(pairs), batch_size):
        part = pairs[i : i + batch_size]
        inputs = _pad([p[0] for p in part], 0)
        start = torch.zeros((len(part), 1), dtype=torch.long)
        logits = model(input_ids=inputs, attention_mask=(inputs != 0).long(), decoder_input_ids=start).logits
        pred = logits[:, 0, label_ids].argmax(-1)
        gold = torch.tensor([label_ids.index(p[1][0]) for p in part])
        correct += int((pred == gold).sum())
    model.train()
    return correct / max(1, len(pairs))


@dataclass
class Prepared:
    tok: Tokenizer
    data: dict[str, list]
    heldout: list
    label_ids: list[int]
    rng: random.Random
    c4: list[str]


def prepare(data_dir: Path, recipe: DemoRecipe, tok: Tokenizer | None = None) -> Prepared:
    """Read and encode the training data; with no tokenizer given, train one (stage 1)."""
    rng = random.Random(recipe.seed)
    sst2 = TASKS["sst2"].read(data_dir / "sst2" / "train.tsv")
    mrpc = TASKS["mrpc"].read(data_dir / "mrpc" / "train.tsv")
    c4 = read_c4_texts(data_dir / "c4_sample" / "c4_sample.jsonl")
    rng.shuffle(sst2)
    heldout, sst2 = sst2[: recipe.heldout], sst2[recipe.heldout :]
    if tok is None:
        tok = train_tokenizer([e.prompt for e in sst2 + mrpc] + c4, recipe.vocab_size)
    data = {
        "sst2": encode_examples(tok, sst2, recipe.max_input_tokens),
        "mrpc": encode_examples(tok, mrpc, recipe.max_input_tokens),
        "c4_lm": lm_pairs(tok, c4, recipe, rng),
    }
    heldout_pairs = encode_examples(tok, heldout, recipe.max_input_tokens)
    label_ids = [tok.token_to_id(w) for w in TASKS["sst2"].labels]
    return Prepared(tok, data, heldout_pairs, label_ids, rng, c4)


def fit(
    model,
    prep: Prepared,
    out_dir: Path,
    epochs: float,
    lr: float,
    warmup: int,
    recipe: DemoRecipe,
    log=print,
    desc="demo-model",
    extra_loss=None,
    keep="best",
) -> dict:
    """AdamW with warm-up and linear decay; the EMA weights with the best held-out accuracy are saved
    (`keep="last"`: the EMA weights at the end, whatever their accuracy).

    `extra_loss(batch)`, if given, is added to the model's loss after each forward (it may read what
    forward hooks saw during that forward)."""
    from tqdm import tqdm

    t0 = time.time()
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    steps_per_epoch = sum(math.ceil(len(v) / recipe.batch_size) for v in prep.data.values())
    total = int(steps_per_epoch * epochs)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    best = {"heldout_acc": -1.0}
    history = []
    eval_every = max(1, min(total, steps_per_epoch // recipe.evals_per_epoch))
    step = 0
    bar = tqdm(total=total, desc=desc, file=sys.stderr, mininterval=5)
    while step < total:
        batches = [
            b for task, pairs in prep.data.items() for b in make_batches(pairs, task, recipe.batch_size, prep.rng)
        ]
        prep.rng.shuffle(batches)
        for b in batches[: total - step]:
            out = model(
                input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels, output_router_logits=True
            )
            loss = out.loss if extra_loss is None else out.loss + extra_loss(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - recipe.ema_decay)
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(
                    loss=f"{out.loss.item():.3f}",
                    z=f"{float(out.encoder_z_loss):.2f}",
                    aux=f"{float(out.encoder_aux_loss):.2f}",
                )
            if step % eval_every == 0 or step == total:
                live = [p.detach().clone() for p in params]
                _load(params, ema)
                acc = label_accuracy(model, prep.tok, prep.heldout, prep.label_ids)
                row = {"step": step, "epoch": round(step / steps_per_epoch, 2), "heldout_acc": acc}
                row["minutes"] = round((time.time() - t0) / 60, 1)
                history.append(row)
                log(json.dumps(row))
                if acc > best["heldout_acc"] or keep == "last":
                    best = dict(row)
                    model.save_pretrained(out_dir, safe_serialization=True)
                _load(params, live)
    bar.close()
    return {"best": best, "history": history, "steps": total, "minutes": round((time.time() - t0) / 60, 1)}


def train(data_dir: Path, out_dir: Path, recipe: DemoRecipe = DemoRecipe(), log=print) -> dict:
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


@torch.no_grad()
def decoder_usage(model, prep: Prepared, batches: int = 40) -> dict[int, tuple[torch.Tensor, list[torch.Tensor]]]:
    """Per decoder MoE block: tokens per expert and the router inputs each expert received, on teacher-forced
    completion batches (padding excluded)."""
    from sida.offload.adapters import SwitchAdapter, capture_routing

    layers = [la for la in SwitchAdapter().moe_layers(model) if la.stack == "decoder"]
    experts = model.config.num_experts
    counts = {la.block: torch.zeros(experts, dtype=torch.long) for la in layers}
    inputs = {la.block: [[] for _ in range(experts)] for la in layers}
    seen = {}
    hooks = [
        la.router.register_forward_hook(lambda m, i, o, b=la.block: seen.__setitem__(b, i[0].detach().float()))
        for la in layers
    ]
    model.eval()
    try:
        for b in make_batches(prep.data["c4_lm"], "c4_lm", 64, random.Random(1))[:batches]:
            start = torch.full_like(b.labels[:, :1], model.config.decoder_start_token_id)
            dec_ids = torch.cat([start, b.labels[:, :-1].clamp(min=0)], dim=1)  # teacher forcing: shifted right
            with capture_routing(layers) as cap:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, decoder_input_ids=dec_ids)
            mask = b.labels != -100
            for la in layers:
                chosen = cap.records[la.index][0].expert[mask]
                counts[la.block] += torch.bincount(chosen, minlength=experts)
                h = seen[la.block][mask]
                for e in chosen.unique().tolist():
                    inputs[la.block][e].append(h[chosen == e])
    finally:
        for hk in hooks:
            hk.remove()
    model.train()
    return {blk: (counts[blk], [torch.cat(x) if x else None for x in inputs[blk]]) for blk in counts}


def experts_used(usage: dict) -> dict[int, int]:
    """Per decoder MoE block of a `decoder_usage` result: how many experts got any token."""
    return {block: int((counts > 0).sum()) for block, (counts, _) in usage.items()}


def idle_experts(counts: torch.Tensor, share: float = 0.05) -> torch.Tensor:
    """Experts given fewer than `share` of an even share of the tokens: those with 1 of 80 000 C4 tokens get
    none of WikiText's."""
    return (counts < share * counts.sum() / counts.numel()).nonzero().flatten()


@torch.no_grad()
def split_dead_experts(model, usage: dict, noise: float = 0.01, seed: int = 0) -> dict:
    """Give every idle decoder expert (see `idle_experts`) a copy of a busy one and split the busy one's tokens
    between the two.

    The pair's router rows become w ± δ, with δ along the donor's tokens' main direction of variation
    (orthogonal to their mean), scaled so that a typical token prefers its side by the median top-1/top-2
    logit gap of those tokens: about half go each way, and other experts' tokens are hardly disturbed.
    """
    g = torch.Generator().manual_seed(seed)
    done = {}
    for block, (counts, inputs) in usage.items():
        mlp = model.decoder.block[block].layer[-1].mlp
        router = mlp.router.classifier.weight  # [experts, d_model]
        dead = idle_experts(counts).tolist()
        donors = counts.argsort(descending=True).tolist()[: len(dead)]
        for d, src in zip(dead, donors):
            h = inputs[src]  # [tokens, d_model]
            mean = h.mean(0)
            centered = h - mean
            direction = torch.linalg.svd(centered, full_matrices=False).Vh[0]
            unit_mean = mean / mean.norm()
            direction = direction - (direction @ unit_mean) * unit_mean
            direction = direction / direction.norm()
            spread = (centered @ direction).abs().median().clamp(min=1e-6)
            top2 = (h @ router.T).topk(2, dim=-1).values  # [tokens, 2] the router's logits, as it chose
            margin = (top2[:, 0] - top2[:, 1]).median()
            delta = direction * (margin / 2) / spread
            for p_dst, p_src in zip(mlp.experts[f"expert_{d}"].parameters(), mlp.experts[f"expert_{src}"].parameters()):
                p_dst.copy_(p_src + noise * p_src.std() * torch.randn(p_src.shape, generator=g))
            base = router[src].clone()
            router[src].copy_(base + delta)
            router[d].copy_(base - delta)
        done[block] = dict(zip(dead, donors))
    return done


def revive(data_dir: Path, out_dir: Path, recipe: DemoRecipe = DemoRecipe(), log=print) -> dict:
    """Stage 2: decoder experts that stage 1 left unused get a copy of a busy expert, then a short fine-tune.

    Decoder MoE layers see one token per classification example, so the per-sequence load-balancing loss
    cannot keep them all alive (DEMO-MODEL-NOTES.md); this stage makes every expert carry tokens.
    """
    from transformers import SwitchTransformersForConditionalGeneration

    torch.manual_seed(recipe.seed + 1)
    prep = prepare(data_dir, recipe, Tokenizer.from_file(str(out_dir / "tokenizer.json")))
    model = SwitchTransformersForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    before = decoder_usage(model, prep)
    split = split_dead_experts(model, before)
    used = experts_used(before)
    log(json.dumps({"decoder_experts_used_before": used, "split": split}))
    report = fit(model, prep, out_dir, recipe.revive_epochs, recipe.revive_lr, 100, recipe, log, desc="revive")
    model = SwitchTransformersForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    split_again, after = split_idle_decoder_experts(model, prep, out_dir, seed=recipe.seed + 1)
    if split_again:  # the fine-tune let a few die again
        report["split_after_finetune"] = split_again
    report["decoder_experts_used"] = {"before": used, "after": after}
    report["heldout_acc_final"] = label_accuracy(model, prep.tok, prep.heldout, prep.label_ids)
    log(json.dumps(report["decoder_experts_used"]))
    return report


def split_idle_decoder_experts(
    model, prep: Prepared, out_dir: Path, seed: int, rounds: int = 3, usage: dict | None = None
) -> tuple[list[dict], dict]:
    """Split busy decoder experts into the idle ones (no fine-tune; up to `rounds` times, as a split can leave
    the copy with no tokens) and save the model if any was idle: ([{block: {idle: donor}} per round],
    {block: experts used afterwards}). `usage`: the model's `decoder_usage`, if the caller has it already."""
    usage = usage if usage is not None else decoder_usage(model, prep)
    splits = []
    while any(len(idle_experts(c)) for c, _ in usage.values()) and len(splits) < rounds:
        splits.append(split_dead_experts(model, usage, seed=seed + len(splits)))
        usage = decoder_usage(model, prep)
    if splits:
        model.save_pretrained(out_dir, safe_serialization=True)
    return splits, experts_used(usage)


def respread(data_dir: Path, out_dir: Path, recipe: DemoRecipe = DemoRecipe(), log=print) -> dict:
    """Stage 4: stage 3's fine-tune lets some decoder experts fall idle again (its router loss is on the
    encoder; the decoder's routers drift with the task loss), so split busy ones into them as stage 2 does,
    without a fine-tune: a split expert is a copy of its donor and the two router rows stay close, so the
    model computes almost what it did, and the encoder (what the predictor learns) is untouched.

    Measured on the shipped model: decoder experts used on C4 continuations 11/10 → 16/16 (two rounds; the
    first left one copy with no tokens), on WikiText-2 continuations 16/16; held-out accuracy 0.895 → 0.895,
    SST-2 dev 0.8039 → 0.8050; encoder traces and the retrained predictor came out byte-identical."""
    from transformers import SwitchTransformersForConditionalGeneration

    prep = prepare(data_dir, recipe, Tokenizer.from_file(str(out_dir / "tokenizer.json")))
    model = SwitchTransformersForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    usage = decoder_usage(model, prep)
    acc_before = label_accuracy(model, prep.tok, prep.heldout, prep.label_ids)
    split, after = split_idle_decoder_experts(model, prep, out_dir, seed=recipe.seed + 4, usage=usage)
    report = {
        "split": split,
        "decoder_experts_used": {"before": experts_used(usage), "after": after},
        "heldout_acc": {"before": acc_before, "after": label_accuracy(model, prep.tok, prep.heldout, prep.label_ids)},
    }
    report["best"] = {"heldout_acc": report["heldout_acc"]["after"]}
    log(json.dumps(report))
    return report


@contextmanager
def training_router_logits(layers):
    """A list that receives (block, router logits) from every training-mode forward of these layers' routers
    (fit()'s held-out evaluations run in eval mode and are not kept); the hooks go when the block ends."""
    seen: list[tuple[int, torch.Tensor]] = []

    def keep(module, _inputs, outputs, block) -> None:
        if module.training:
            seen.append((block, outputs[2]))

    hooks = [la.router.register_forward_hook(lambda m, i, o, block=la.block: keep(m, i, o, block)) for la in layers]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def sharpen(data_dir: Path, out_dir: Path, recipe: DemoRecipe = DemoRecipe(), log=print) -> dict:
    """Experiment (not in the shipped recipe): fine-tune with a penalty on the encoder routers' entropy (real
    tokens only), so that routers stop being near-uniform and a token's expert is a clearer choice.

    Measured on the shipped model (1 epoch, held-out accuracy 0.883; "token-majority" = each token's most
    frequent expert on 8000 SST-2 train sentences, scored on SST-2 dev):
    aux 0.01: mean top-1 router prob 0.12/0.09 → 0.20/0.14, token-majority top-1 0.62/0.47 → 0.71/0.57,
    but dev uses 12 and 9 of 16 experts (was 16/16); aux 0.001: 0.80/0.69, with 11 and 7 experts used.
    Sharper routers are more predictable only by collapsing onto fewer experts, so the demo keeps stage 2."""
    from transformers import SwitchTransformersForConditionalGeneration

    from sida.offload.adapters import SwitchAdapter

    torch.manual_seed(recipe.seed + 2)
    prep = prepare(data_dir, recipe, Tokenizer.from_file(str(out_dir / "tokenizer.json")))
    model = SwitchTransformersForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    model.config.router_aux_loss_coef = model.router_aux_loss_coef = recipe.sharpen_aux_loss_coef
    layers = [la for la in SwitchAdapter().moe_layers(model) if la.stack == "encoder"]
    before = router_confidence(model, prep, layers)
    log(json.dumps({"router_confidence_before": before}))
    with training_router_logits(layers) as seen:

        def entropy(b: Batch) -> torch.Tensor:
            mask = b.attention_mask.bool()
            h = [-(lg.float().log_softmax(-1) * lg.float().softmax(-1)).sum(-1)[mask].mean() for _, lg in seen]
            seen.clear()
            return recipe.sharpen_entropy * torch.stack(h).mean()

        report = fit(
            model, prep, out_dir, recipe.sharpen_epochs, recipe.sharpen_lr, 100, recipe, log, "sharpen", entropy
        )
    model = SwitchTransformersForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    layers = [la for la in SwitchAdapter().moe_layers(model) if la.stack == "encoder"]
    report["router_confidence"] = {"before": before, "after": router_confidence(model, prep, layers)}
    log(json.dumps(report["router_confidence"]))
    return report


@torch.no_grad()
def token_routing(model, prep: Prepared, layers, sequences: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per encoder MoE block, over real tokens of up to `sequences` training inputs (SST-2, MRPC and the C4
    prefixes, mixed): ([vocab, experts] counts of the router's choice per token id, [vocab, experts] sums of
    its router logits per token id)."""
    from sida.offload.adapters import capture_routing

    model.eval()
    vocab, experts = model.config.vocab_size, model.config.num_experts
    counts = {la.block: torch.zeros(vocab * experts, dtype=torch.long) for la in layers}
    sums = {la.block: torch.zeros(vocab, experts) for la in layers}
    pairs = [p for v in prep.data.values() for p in v]
    random.Random(prep.rng.random()).shuffle(pairs)
    for b in make_batches(pairs[:sequences], "mixed", 128, random.Random(0)):
        with capture_routing(layers) as cap:
            model.encoder(input_ids=b.input_ids, attention_mask=b.attention_mask)
        mask = b.attention_mask.bool()
        ids = b.input_ids[mask]
        for la in layers:
            (rec,) = cap.records[la.index]
            counts[la.block] += torch.bincount(ids * experts + rec.expert[mask], minlength=vocab * experts)
            sums[la.block].index_add_(0, ids, rec.logits[mask])
    model.train()
    return {block: (c.view(vocab, experts), sums[block]) for block, c in counts.items()}


def balanced_assignment(
    counts: torch.Tensor, logit_sums: torch.Tensor, slack: float, iters: int = 2000
) -> torch.Tensor:
    """Each token id seen in `counts` [vocab, experts] gets the expert of argmax(mean router logits + b), with
    one offset b per expert chosen (dual ascent) so that every expert holds between 1 / (slack·E) and
    slack / E of the token occurrences. Offsets keep the assignment a linear function of the routers'
    scores, so a router can learn it; unseen tokens get -1 (no target)."""
    freq = counts.sum(1).double()
    seen = freq > 0
    scores = logit_sums[seen].double() / freq[seen, None]
    weight = freq[seen] / freq[seen].sum()
    experts = scores.shape[1]
    step = 0.05 * float(scores.std())
    offsets = torch.zeros(experts, dtype=torch.float64)
    best, best_max = None, float("inf")
    for _ in range(iters):
        choice = (scores + offsets).argmax(1)
        load = torch.bincount(choice, weights=weight, minlength=experts) * experts
        spread = max(float(load.max()), 1.0 / max(float(load.min()), 1e-9))
        if spread < best_max:
            best, best_max = choice, spread
        if best_max <= slack:
            break
        offsets -= step * (load - 1.0)
    target = torch.full((counts.shape[0],), -1, dtype=torch.long)
    target[seen] = best
    return target


def consistent(data_dir: Path, out_dir: Path, recipe: DemoRecipe = DemoRecipe(), log=print) -> dict:
    """Stage 3: one `consistent_round` per entry of `recipe.consistent_weights`, each on the previous one's model."""
    rounds = [consistent_round(data_dir, out_dir, recipe, w, log) for w in recipe.consistent_weights]
    report = dict(rounds[-1])
    report["rounds"] = rounds
    return report


def consistent_round(data_dir: Path, out_dir: Path, recipe: DemoRecipe, weight: float, log=print) -> dict:
    """Make each encoder MoE layer route a token id to one expert whatever its context (one epoch).

    Stages 1–2 leave the encoder routers near-uniform (mean top-1 probability 0.12/0.09 of 16 experts), so
    a token's expert flips with small changes of its context, which trained Switch checkpoints do not do
    (their encoder routing follows token identity) and which makes expert prediction artificially hard.
    Here the model's own routing is counted on training inputs, each token id is assigned the expert it
    was sent to most often (balanced: no expert above `consistent_slack` / E of the occurrences), and the
    model is fine-tuned with its task loss + `weight` × the routers' cross-entropy against that assignment
    (real tokens only) + the usual load-balancing loss; the assignment is re-derived from the moving routing
    every `consistent_refresh` steps. The router still makes the choice from the hidden state at inference;
    how often it agrees with the assignment is measured and reported.

    Measured (rounds 0.3, 1.0, 2.0, encoder blocks 1/3): mean top-1 router probability 0.12/0.09 → 0.64/0.71 →
    0.88/0.92 → 0.95/0.97; agreement with the assignment 0.85/0.79 → 0.96/0.96 → 0.989/0.989; 16 of 16 encoder
    experts used throughout; held-out accuracy 0.883 → 0.890 → 0.895. Decoder layers are not constrained, and
    some of their experts fell out of use (11 and 10 of 16 on WikiText continuations): stage 4 (`respread`)."""
    from transformers import SwitchTransformersForConditionalGeneration

    from sida.offload.adapters import SwitchAdapter

    torch.manual_seed(recipe.seed + 3)  # each round as its own `--stage consistent --consistent-weights w` run
    prep = prepare(data_dir, recipe, Tokenizer.from_file(str(out_dir / "tokenizer.json")))
    model = SwitchTransformersForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    layers = [la for la in SwitchAdapter().moe_layers(model) if la.stack == "encoder"]
    before = router_confidence(model, prep, layers)
    stats = token_routing(model, prep, layers, recipe.consistent_sequences)
    counts = {block: c for block, (c, _) in stats.items()}
    sums = {block: z for block, (_, z) in stats.items()}
    targets = {block: balanced_assignment(counts[block], sums[block], recipe.consistent_slack) for block in counts}
    seeded = {
        block: round(float(counts[block].max(1).values.sum() / counts[block].sum()), 4) for block in counts
    }  # how often the router already agreed with each token's majority expert
    log(json.dumps({"router_confidence_before": before, "token_majority_agreement_before": seeded}))
    with training_router_logits(layers) as seen:
        steps = [0]

        def router_ce(b: Batch) -> torch.Tensor:
            steps[0] += 1
            if steps[0] % recipe.consistent_refresh == 0:  # the assignment follows the routing as the model moves
                fresh = token_routing(model, prep, layers, recipe.consistent_sequences // 4)
                for block, (c, z) in fresh.items():  # the older counts weigh half as much at each re-count
                    counts[block] = counts[block] // 2 + c
                    sums[block] = sums[block] / 2 + z
                    targets[block] = balanced_assignment(counts[block], sums[block], recipe.consistent_slack)
            mask = b.attention_mask.bool()
            terms = []
            for block, logits in seen:
                want = targets[block][b.input_ids][mask]
                known = want >= 0
                terms.append(torch.nn.functional.cross_entropy(logits.float()[mask][known], want[known]))
            seen.clear()
            return weight * torch.stack(terms).mean()

        # A short EMA horizon and the last weights: a longer average would blend the routers back towards stage 2's.
        short = replace(recipe, ema_decay=0.995)
        report = fit(
            model,
            prep,
            out_dir,
            1.0,
            recipe.consistent_lr,
            100,
            short,
            log,
            f"consistent {weight}",
            router_ce,
            keep="last",
        )
    model = SwitchTransformersForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    layers = [la for la in SwitchAdapter().moe_layers(model) if la.stack == "encoder"]
    after = {block: c for block, (c, _) in token_routing(model, prep, layers, recipe.consistent_sequences).items()}
    report["router_confidence"] = {"before": before, "after": router_confidence(model, prep, layers)}
    report["agreement_with_assignment"] = {
        block: round(float(after[block].gather(1, targets[block].clamp(min=0)[:, None]).sum() / after[block].sum()), 4)
        for block in after
    }
    log(json.dumps({k: report[k] for k in ("router_confidence", "agreement_with_assignment")}))
    return report


@torch.no_grad()
def router_confidence(model, prep: Prepared, layers) -> dict:
    """Per encoder MoE block, on the held-out rows: mean top-1 router probability, mean top-1 − top-2 margin,
    experts used and the largest expert's share of tokens."""
    from sida.offload.adapters import capture_routing

    model.eval()
    top1 = {la.block: [] for la in layers}
    margin = {la.block: [] for la in layers}
    chosen = {la.block: [] for la in layers}
    for b in make_batches(prep.heldout, "sst2", 128, random.Random(0)):
        with capture_routing(layers) as cap:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        mask = b.attention_mask.bool()
        for la in layers:
            (rec,) = cap.records[la.index]
            p2 = rec.logits.softmax(-1).topk(2, dim=-1).values[mask]
            top1[la.block].append(p2[:, 0])
            margin[la.block].append(p2[:, 0] - p2[:, 1])
            chosen[la.block].append(rec.expert[mask])
    model.train()
    out = {}
    for la in layers:
        counts = torch.bincount(torch.cat(chosen[la.block]), minlength=model.config.num_experts)
        out[la.block] = {
            "mean_top1_prob": round(float(torch.cat(top1[la.block]).mean()), 4),
            "mean_margin": round(float(torch.cat(margin[la.block]).mean()), 4),
            "experts_used": int((counts > 0).sum()),
            "max_share": round(float(counts.max() / counts.sum()), 4),
        }
    return out


@torch.no_grad()
def _load(params, values) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def finalize(out_dir: Path, reports: dict, recipe: DemoRecipe) -> None:
    """Store the chosen checkpoint as fp16 safetensors and record how it was made."""
    from transformers import SwitchTransformersForConditionalGeneration

    model = SwitchTransformersForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    model.half().save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "training.json").write_text(json.dumps({"recipe": asdict(recipe), **reports}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("models/sida-switch-demo"))
    p.add_argument("--epochs", type=int, default=DemoRecipe.epochs)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--consistent-weights",
        type=lambda v: tuple(float(x) for x in v.split(",")),
        default=DemoRecipe.consistent_weights,
        help="stage 3's rounds (comma-separated router cross-entropy coefficients, one epoch each)",
    )
    p.add_argument(
        "--stage",
        choices=["all", "revive", "consistent", "respread", "sharpen"],
        default="all",
        help="revive: stages 2-4 on --out; consistent: stages 3-4 on --out; respread: stage 4 only, on --out; "
        "sharpen: the router-sharpening experiment, on --out",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = DemoRecipe(epochs=args.epochs, consistent_weights=args.consistent_weights)
    reports = {}
    if args.stage == "all":
        reports["stage1"] = train(args.data, args.out, recipe)
        finalize(args.out, reports, recipe)
    else:
        reports = json.loads((args.out / "training.json").read_text())
        reports = {k: v for k, v in reports.items() if k != "recipe"}
        if "stage1" not in reports:  # a stage-1 report written before stages were named
            reports = {"stage1": reports}
    if args.stage in ("all", "revive"):
        reports["stage2"] = revive(args.data, args.out, recipe)
    if args.stage in ("all", "revive", "consistent"):
        reports["stage3"] = consistent(args.data, args.out, recipe)
    if args.stage in ("all", "revive", "consistent", "respread"):
        reports["stage4"] = respread(args.data, args.out, recipe)
    if args.stage == "sharpen":  # an experiment, not part of the shipped recipe (its docstring says what it gave)
        reports["sharpen"] = sharpen(args.data, args.out, recipe)
    finalize(args.out, reports, recipe)
    print(json.dumps({k: v["best"] for k, v in reports.items()}))


if __name__ == "__main__":
    main()
