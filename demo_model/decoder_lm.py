"""Builds the decoder-only MoE demo model: a small OLMoE causal LM (every layer MoE, top-2 of 16 experts) trained
here on the shared data, its SiDA hash predictor trained from its router traces, and its model card.

`python -m sida.demo_model.decoder_lm --data ../shared/data --out models/sida-olmoe-demo [--minutes M]`
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, OlmoeConfig, OlmoeForCausalLM
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from sida.offload.model_loader import fingerprint, load_model
from sida.offload.tasks import TASKS, Example
from sida.predictor.artifact import save_predictor
from sida.predictor.corpora import read_c4_texts, read_multirc_passages
from sida.predictor.decode_ahead import build as build_ahead
from sida.predictor.traces import collect_lm_traces
from sida.predictor.train import TrainConfig, hit_rates, train

from .decoder_card import encode_prompts, label_accuracy, lm_blocks, lm_loss, wikitext_split, write_card

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # ids, mask [batch, seq]; label positions [batch]


@dataclass(frozen=True)
class OlmoeRecipe:
    """Every hyper-parameter of the OLMoE demo model, its training and its predictor (kept in training.json)."""

    hidden_size: int = 128
    intermediate_size: int = 256  # per expert
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 16
    top_k: int = 2
    router_aux_loss_coef: float = 0.01  # load-balancing loss, balanced per layer (see `router_balance_loss`)
    block_tokens: int = 128  # causal-LM rows; classification prompts are cut to fit
    lm_batch: int = 32
    cls_batch: int = 64
    sst2_rows_per_epoch: int = 20000  # a fresh sample each epoch: more of the budget goes to plain text
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decay to this share of lr
    warmup_steps: int = 200
    weight_decay: float = 0.01
    label_weight: float = 1.0  # extra cross-entropy on the label word of classification rows
    minutes: float = 30.0  # wall-clock training budget; the learning rate decays over it
    max_steps: int = 0  # 0: no step limit (tests set one)
    checkpoint_minutes: float = 2.0
    eval_minutes: float = 5.0
    wiki_heldout_articles: int = 20  # the last WikiText-2 valid articles: never trained on
    val_c4_docs: int = 20  # the last C4 documents: validation during training, never trained on
    val_sst2_rows: int = 500  # SST-2 train rows: validation during training, never trained on
    predictor_sst2_rows: int = 20000
    predictor_epochs: int = 20
    seed: int = 0


def make_model(recipe: OlmoeRecipe, tok) -> OlmoeForCausalLM:
    """A fresh OLMoE causal LM of `recipe` over `tok`'s vocabulary (tied input/output embeddings)."""
    config = OlmoeConfig(
        vocab_size=len(tok),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.top_k,
        router_aux_loss_coef=recipe.router_aux_loss_coef,
        max_position_embeddings=tok.model_max_length,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    config.sida_labels = {name: list(TASKS[name].labels) for name in ("sst2", "mrpc")}
    torch.manual_seed(recipe.seed)
    model = OlmoeForCausalLM(config)
    model.generation_config.update(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model.generation_config.update(eos_token_id=tok.eos_token_id)
    return model


# The chat template `/v1/chat/completions` formats messages with: role markers spelled in text the vocabulary
# already has (`<`, `|`, the role, `|`, `>`; the weights are fixed, so no token is added), the BOS first as the
# model was trained, and `<|assistant|>` last where the answer begins.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def copy_tokenizer(src: Path, out: Path):
    """The Switch demo's tokenizer (same vocabulary) for a causal LM: EOS `</s>` also serves as BOS and is put
    before every input instead of after it, so that a prompt ends on its last word, where the next token (a label
    word, a continuation) is predicted; with a chat template (`CHAT_TEMPLATE`)."""
    spec = json.loads((src / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "</s>", "type_id": 0}}
    seq = [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, seq[0]],
        "pair": [bos, *seq],
        "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config = {**config, "bos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(out, local_files_only=True)


@dataclass
class TrainData:
    """The encoded training rows and the validation rows that are watched during training."""

    lm: torch.Tensor  # [rows, block] C4 + MultiRC passages + WikiText-2 valid (less the held-out articles)
    cls: dict[str, list[tuple[list[int], int]]]  # task -> train prompt + label word + EOS, and the label's position
    val_lm: torch.Tensor  # [rows, block] the last C4 documents
    val_sst2: list[Example]


def read_data(data_dir: Path, tok, recipe: OlmoeRecipe) -> TrainData:
    """Read and encode the training and validation text of `data_dir`."""
    c4 = read_c4_texts(data_dir / "c4_sample" / "c4_sample.jsonl")
    wiki, _ = wikitext_split(data_dir / "wikitext2" / "wiki.valid.tokens", recipe.wiki_heldout_articles)
    texts = c4[: -recipe.val_c4_docs] + read_multirc_passages(data_dir / "multirc" / "train.jsonl") + wiki
    sst2 = TASKS["sst2"].read(data_dir / "sst2" / "train.tsv")
    random.Random(recipe.seed).shuffle(sst2)
    label = {w: tok.convert_tokens_to_ids(w) for t in ("sst2", "mrpc") for w in TASKS[t].labels}
    cls = {}
    for task, examples in (
        ("sst2", sst2[recipe.val_sst2_rows :]),
        ("mrpc", TASKS["mrpc"].read(data_dir / "mrpc" / "train.tsv")),
    ):
        prompts = encode_prompts(tok, [e.prompt for e in examples], recipe.block_tokens)
        cls[task] = [(ids + [label[e.label], tok.eos_token_id], len(ids)) for e, ids in zip(examples, prompts)]
    val_lm = lm_blocks(tok, c4[-recipe.val_c4_docs :], recipe.block_tokens)
    return TrainData(lm_blocks(tok, texts, recipe.block_tokens), cls, val_lm, sst2[: recipe.val_sst2_rows])


def epoch_batches(data: TrainData, recipe: OlmoeRecipe, epoch: int) -> list[Batch]:
    """One epoch's batches, LM and classification shuffled together; classification rows are sorted by length
    within windows of 50 batches (little padding, still random); SST-2 contributes a fresh sample of
    `sst2_rows_per_epoch` rows. The same for the same epoch (resumable)."""
    rng = random.Random(recipe.seed * 1000 + epoch)
    order = list(range(len(data.lm)))
    rng.shuffle(order)
    batches: list[Batch] = []
    for i in range(0, len(order), recipe.lm_batch):
        ids = data.lm[order[i : i + recipe.lm_batch]]
        batches.append((ids, torch.ones_like(ids), None))
    sst2 = data.cls["sst2"]
    rows = rng.sample(sst2, min(len(sst2), recipe.sst2_rows_per_epoch)) + data.cls["mrpc"]
    rng.shuffle(rows)
    window = recipe.cls_batch * 50
    for start in range(0, len(rows), window):
        chunk = sorted(rows[start : start + window], key=lambda r: len(r[0]))
        for i in range(0, len(chunk), recipe.cls_batch):
            part = chunk[i : i + recipe.cls_batch]
            width = max(len(ids) for ids, _ in part)
            ids = torch.tensor([r + [0] * (width - len(r)) for r, _ in part])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in part])
            batches.append((ids, mask, torch.tensor([at for _, at in part])))
    rng.shuffle(batches)
    return batches


def batch_loss(model: OlmoeForCausalLM, batch: Batch, recipe: OlmoeRecipe) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy on the real tokens + aux (load-balancing) loss + label-word cross-entropy."""
    ids, mask, label_at = batch
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    logits = out.logits[:, :-1].float()  # [batch, seq - 1, vocab]: position t predicts token t + 1
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    lm = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    aux = router_balance_loss(out.router_logits, mask, recipe)
    loss = lm + recipe.router_aux_loss_coef * aux
    parts = {"lm": lm.item(), "aux": aux.item()}
    if label_at is not None:
        rows = torch.arange(len(ids))
        cls = F.cross_entropy(logits[rows, label_at - 1], ids[rows, label_at])
        loss = loss + recipe.label_weight * cls
        parts["cls"] = cls.item()
    return loss, parts


def router_balance_loss(router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor, recipe: OlmoeRecipe):
    """The load-balancing loss of each MoE layer on its own, averaged over layers. The library's `aux_loss` pools
    the routing of all layers before balancing, which lets a layer leave experts unused while the pooled counts
    stay even."""
    per_layer = [load_balancing_loss_func((g,), recipe.num_experts, recipe.top_k, mask) for g in router_logits]
    return torch.stack(per_layer).mean()


@torch.no_grad()
def experts_used(model, blocks: torch.Tensor, top_k: int) -> list[int]:
    """Per MoE layer, how many experts are among some real token's top-k on `blocks` [n, block]."""
    out = model(input_ids=blocks, output_router_logits=True, use_cache=False)
    return [int(g.topk(top_k, dim=-1).indices.unique().numel()) for g in out.router_logits]


def learning_rate(recipe: OlmoeRecipe, state: dict) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` over the time budget (or `max_steps`)."""
    progress = state["seconds"] / (recipe.minutes * 60)
    if recipe.max_steps:
        progress = max(progress, state["step"] / recipe.max_steps)
    warm = min(1.0, (state["step"] + 1) / recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return recipe.lr * warm * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine)


def _done(recipe: OlmoeRecipe, state: dict) -> bool:
    return state["seconds"] >= recipe.minutes * 60 or bool(recipe.max_steps and state["step"] >= recipe.max_steps)


def evaluate(model, tok, data: TrainData, recipe: OlmoeRecipe, state: dict, log) -> None:
    """Validation loss and SST-2 accuracy (rows carved from train, never trained on), logged and kept in history."""
    model.eval()
    loss, _ = lm_loss(model, data.val_lm)
    acc = label_accuracy(model, tok, data.val_sst2, "sst2", recipe.block_tokens)
    used = experts_used(model, data.val_lm[:32], recipe.top_k)
    model.train()
    row = {"step": state["step"], "epoch": state["epoch"], "minutes": round(state["seconds"] / 60, 2)}
    row.update(val_c4_loss=round(loss, 4), val_sst2_acc=round(acc, 4), val_experts_used=used, tokens=state["tokens"])
    state["history"].append(row)
    log(json.dumps(row))


def _save_checkpoint(path: Path, run: str, model, opt, state: dict) -> None:
    """Everything a resumed run needs, written atomically."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": json.dumps(state), "run": run}, tmp)
    tmp.replace(path)


def train_model(model, tok, data: TrainData, recipe: OlmoeRecipe, work: Path, log=print) -> dict:
    """Train until the time budget (or `max_steps`) is spent, checkpointing into `work` every few minutes and
    resuming from a checkpoint of the same run; returns the training state (steps, minutes, history)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95))
    state = {"step": 0, "epoch": 0, "pos": 0, "seconds": 0.0, "tokens": 0, "history": []}
    sizes = {"lm": len(data.lm), **{task: len(rows) for task, rows in data.cls.items()}}
    run = json.dumps({"recipe": asdict(recipe), **sizes}, sort_keys=True)
    ckpt = work / "checkpoint.pt"
    if ckpt.is_file() and (saved := torch.load(ckpt, weights_only=True))["run"] == run:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = json.loads(saved["state"])
        log(f"resumed from {ckpt} at step {state['step']} ({state['seconds'] / 60:.1f} min)")
    model.train()
    marks = {"ckpt": state["seconds"], "eval": state["seconds"]}
    while not _done(recipe, state):
        batches = epoch_batches(data, recipe, state["epoch"])
        while state["pos"] < len(batches) and not _done(recipe, state):
            _train_step(model, opt, batches[state["pos"]], recipe, state, log)
            if state["seconds"] - marks["eval"] >= recipe.eval_minutes * 60:
                evaluate(model, tok, data, recipe, state, log)
                marks["eval"] = state["seconds"]
            if state["seconds"] - marks["ckpt"] >= recipe.checkpoint_minutes * 60:
                _save_checkpoint(ckpt, run, model, opt, state)
                marks["ckpt"] = state["seconds"]
        if state["pos"] >= len(batches):
            state["epoch"], state["pos"] = state["epoch"] + 1, 0
    evaluate(model, tok, data, recipe, state, log)
    _save_checkpoint(ckpt, run, model, opt, state)
    model.eval()
    return state


def _train_step(model, opt, batch: Batch, recipe: OlmoeRecipe, state: dict, log) -> None:
    """One optimizer step on `batch`; its wall time counts against the budget (with the evaluations)."""
    t0 = time.time()
    lr = learning_rate(recipe, state)
    for group in opt.param_groups:
        group["lr"] = lr
    loss, parts = batch_loss(model, batch, recipe)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    state["step"] += 1
    state["pos"] += 1
    state["tokens"] += int(batch[1].sum())
    state["seconds"] += time.time() - t0
    if state["step"] % 50 == 0:
        log(json.dumps({"step": state["step"], "min": round(state["seconds"] / 60, 2), "lr": round(lr, 6), **parts}))


def build_predictor(out: Path, data_dir: Path, recipe: OlmoeRecipe, work: Path, log=print) -> dict:
    """Train the hash predictor from the saved model's router traces on C4, SST-2 and MRPC train text; save it in
    `out/predictor` with its training report and its held-out (WikiText-2) hit rates."""
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    fp = fingerprint(out)
    sst2 = [e.prompt for e in TASKS["sst2"].read(data_dir / "sst2" / "train.tsv", recipe.predictor_sst2_rows)]
    mrpc = [e.prompt for e in TASKS["mrpc"].read(data_dir / "mrpc" / "train.tsv")]
    texts = read_c4_texts(data_dir / "c4_sample" / "c4_sample.jsonl") + sst2 + mrpc
    e, block = recipe.num_experts, recipe.block_tokens
    traces = collect_lm_traces(model, tok, texts, fp, top_t=e, max_tokens=block)
    log(f"traces: {len(traces)} rows, {int(traces.attention_mask.sum())} tokens")
    embeddings = model.get_input_embeddings().weight.detach().float()
    cfg = TrainConfig(max_epochs=recipe.predictor_epochs, seed=recipe.seed)
    pred, report = train(traces, embeddings, e, cfg, ckpt=work / "predictor.ckpt", log=log)
    _, wiki = wikitext_split(data_dir / "wikitext2" / "wiki.valid.tokens", recipe.wiki_heldout_articles)
    heldout = collect_lm_traces(model, tok, wiki, fp, top_t=e, max_tokens=block)
    report["heldout_wikitext"] = hit_rates(pred, heldout, ks=(1, 2, 3))
    data = [f"c4_sample (all {len(texts) - len(sst2) - len(mrpc)} documents)", f"sst2 train (first {len(sst2)})"]
    info = {"training_data": data + [f"mrpc train ({len(mrpc)})"], "max_tokens": block, "training": report}
    save_predictor(pred, out / "predictor", fp, info)
    log(json.dumps({"predictor_heldout": report["heldout_wikitext"]["per_layer"]}))
    return report


def build(data_dir: Path, out: Path, recipe: OlmoeRecipe, work: Path, tokenizer_from: Path, log=print) -> dict:
    """Train the model, save it (fp16 safetensors + tokenizer + training.json), train its predictor, write its card."""
    torch.manual_seed(recipe.seed)
    work.mkdir(parents=True, exist_ok=True)
    tok = copy_tokenizer(tokenizer_from, work / "tokenizer")
    model = make_model(recipe, tok)
    data = read_data(data_dir, tok, recipe)
    prompts = {task: len(rows) for task, rows in data.cls.items()}
    log(f"{sum(p.numel() for p in model.parameters())} parameters; {len(data.lm)} LM rows, prompts {prompts}")
    state = train_model(model, tok, data, recipe, work, log)
    if out.exists():
        shutil.rmtree(out)
    model.to(torch.float16).save_pretrained(out)
    copy_tokenizer(tokenizer_from, out)
    state.pop("pos")
    (out / "training.json").write_text(json.dumps({"recipe": asdict(recipe), "training": state}, indent=1) + "\n")
    build_predictor(out, data_dir, recipe, work, log)
    build_decode_ahead(out, data_dir, log)
    return write_card(out, data_dir)


def build_decode_ahead(out: Path, data_dir: Path, log=print) -> dict:
    """Train the decode-step predictor (`sida predictor ahead`) of the saved model into `out/predictor`."""
    loaded = load_model(out, "float32")
    net, info = build_ahead(loaded, data_dir)
    net.save(out / "predictor", loaded.fingerprint, info)
    log(json.dumps({"decode_ahead_heldout": info["heldout_recall"]}))
    return info


def main(argv: list[str] | None = None) -> None:
    """Command line: build everything, or (`--stage predictor|ahead|card`) redo that part and the card of --out."""
    p = argparse.ArgumentParser(prog="python -m sida.demo_model.decoder_lm", description=__doc__)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("models/sida-olmoe-demo"))
    p.add_argument("--work", type=Path, default=Path("runs/olmoe-demo"), help="checkpoints and predictor checkpoint")
    p.add_argument("--tokenizer-from", type=Path, default=Path("models/sida-switch-demo"))
    p.add_argument("--minutes", type=float, default=OlmoeRecipe.minutes, help="training wall-clock budget")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--stage", choices=("all", "predictor", "ahead", "card"), default="all")
    args = p.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    if args.stage == "all":
        m = build(args.data, args.out, OlmoeRecipe(minutes=args.minutes), args.work, args.tokenizer_from)
    else:
        recipe = OlmoeRecipe(**json.loads((args.out / "training.json").read_text())["recipe"])
        if args.stage == "predictor":
            build_predictor(args.out, args.data, recipe, args.work)
        if args.stage == "ahead":
            build_decode_ahead(args.out, args.data)
        m = write_card(args.out, args.data)
    print(json.dumps({k: m[k] for k in ("wikitext_perplexity", "sst2_dev_accuracy", "fingerprint")}))


if __name__ == "__main__":
    main()
