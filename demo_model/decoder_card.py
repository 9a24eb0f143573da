"""Measures the decoder-only MoE demo model (`decoder_lm`) and writes its model card (README.md and card.json).

Every figure is measured on the files as shipped (fp16 weights loaded as fp32) and on text the model never
trained on: the held-out WikiText-2 valid articles and the SST-2/MRPC dev sets.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from sida.offload.model_loader import fingerprint
from sida.offload.tasks import TASKS, Example
from sida.predictor.artifact import load_predictor
from sida.predictor.decode_ahead import DecodeAhead
from sida.predictor.network import HashPredictor
from sida.predictor.traces import TraceSet, collect_lm_traces
from sida.predictor.train import hit_rates

SAMPLE_PROMPTS = ("The city council met on Tuesday to discuss", "This movie is", "The best way to learn a language is")
MIN_COUNT = 5  # a token needs this many held-out occurrences to count in the "same token, same expert" rate
TABLE_TOKENS = 10  # rows of the frequent-token routing table


def wikitext_split(path: Path, heldout_articles: int) -> tuple[list[str], list[str]]:
    """(training paragraphs, held-out paragraphs) of a WikiText file: the last `heldout_articles` articles are
    held out. Headings and blank lines are dropped; `@-@`, `@,@`, `@.@` become plain `-`, `,`, `.`."""
    articles: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("= ") and not text.startswith("= = "):
            articles.append([])
        elif text and not text.startswith("=") and articles:
            articles[-1].append(text.replace("@-@", "-").replace("@,@", ",").replace("@.@", "."))
    cut = len(articles) - heldout_articles
    return [p for a in articles[:cut] for p in a], [p for a in articles[cut:] for p in a]


def lm_blocks(tok, texts: list[str], block: int) -> torch.Tensor:
    """[n, block] causal-LM rows: every text as BOS + tokens + EOS, concatenated, cut into `block`-token rows
    (the remainder dropped)."""
    ids: list[int] = []
    for enc in tok(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids += [tok.bos_token_id, *enc, tok.eos_token_id]
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


@torch.no_grad()
def lm_loss(model, blocks: torch.Tensor, batch_size: int = 32) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats, tokens scored) over `blocks` [n, block]."""
    total, tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [batch, block - 1, vocab]
        total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        tokens += ids[:, 1:].numel()
    return total / max(1, tokens), tokens


def encode_prompts(tok, prompts: list[str], max_len: int) -> list[list[int]]:
    """Each prompt as the model reads it (BOS first), cut so that the prompt, its label word and EOS fit `max_len`."""
    return [ids[: max_len - 2] for ids in tok(prompts)["input_ids"]]


@torch.no_grad()
def label_accuracy(model, tok, examples: list[Example], task: str, max_len: int, batch_size: int = 64) -> float:
    """Share of `examples` whose label word has the highest logit, among the task's label words, at the last prompt
    position."""
    label_ids = torch.tensor(tok.convert_tokens_to_ids(list(TASKS[task].labels)))
    correct = 0
    for start in range(0, len(examples), batch_size):
        part = examples[start : start + batch_size]
        encoded = encode_prompts(tok, [e.prompt for e in part], max_len)
        width = max(len(e) for e in encoded)
        ids = torch.tensor([e + [0] * (width - len(e)) for e in encoded])  # [batch, seq], right-padded
        mask = (torch.arange(width)[None] < torch.tensor([len(e) for e in encoded])[:, None]).long()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [batch, seq, vocab]
        last = logits[torch.arange(len(part)), mask.sum(1) - 1][:, label_ids]  # [batch, labels]
        gold = torch.tensor([TASKS[task].labels.index(e.label) for e in part])
        correct += int((last.argmax(-1) == gold).sum())
    return correct / max(1, len(examples))


def routing_figures(traces: TraceSet, num_experts: int, top_k: int) -> dict[str, dict]:
    """Per MoE layer over the real tokens of `traces`: expert use (share of the top-k slots per expert, its entropy
    in bits, experts never chosen, top-1 counts) and router confidence (top-1 probability, top-1 - top-2 margin)."""
    mask = traces.attention_mask.bool()
    report = {}
    for layer in traces.layers:
        top, prob = traces.top_idx[layer][mask], traces.top_prob[layer][mask]  # [tokens, T]
        slots = torch.bincount(top[:, :top_k].flatten(), minlength=num_experts).double()
        share = slots / slots.sum()
        nonzero = share[share > 0]
        report[str(layer)] = {
            "tokens": int(mask.sum()),
            "slot_share": [round(float(s), 4) for s in share],
            "entropy_bits": round(float(-(nonzero * nonzero.log2()).sum()), 4),
            "experts_unused": int((slots == 0).sum()),
            "max_share": round(float(share.max()), 4),
            "top1_counts": torch.bincount(top[:, 0], minlength=num_experts).tolist(),
            "mean_top1_prob": round(float(prob[:, 0].mean()), 4),
            "mean_margin": round(float((prob[:, 0] - prob[:, 1]).mean()), 4),
            "mean_topk_mass": round(float(prob[:, :top_k].sum(-1).mean()), 4),
        }
    return report


def _same_expert_rate(token: torch.Tensor, expert: torch.Tensor, vocab: int, num_experts: int) -> tuple[float, float]:
    """(share of occurrences of tokens seen >= MIN_COUNT times that go to the token's most common expert, share of
    all occurrences those tokens cover)."""
    counts = torch.bincount(token * num_experts + expert, minlength=vocab * num_experts).view(vocab, num_experts)
    occ = counts.sum(1)
    keep = occ >= MIN_COUNT
    return float(counts[keep].max(1).values.sum() / occ[keep].sum()), float(occ[keep].sum() / occ.sum())


def token_routing(traces: TraceSet, tok, num_experts: int) -> dict:
    """How much a token's identity decides its top-1 expert, per layer: the "same token -> same expert" rate,
    against the same rate with the experts shuffled over the occurrences (what token-blind routing with the same
    loads gives); and the dominant experts of the most frequent tokens. Special tokens (BOS) are left out."""
    mask = traces.attention_mask.bool() & (traces.input_ids >= 3)
    token = traces.input_ids[mask]
    vocab = int(traces.input_ids.max()) + 1
    perm = torch.randperm(len(token), generator=torch.Generator().manual_seed(0))
    rates = {}
    frequent = torch.bincount(token, minlength=vocab).topk(TABLE_TOKENS).indices
    table = [{"token": tok.convert_ids_to_tokens(int(t)), "count": int((token == t).sum())} for t in frequent]
    for layer in traces.layers:
        expert = traces.top_idx[layer][..., 0][mask]
        rate, covered = _same_expert_rate(token, expert, vocab, num_experts)
        shuffled, _ = _same_expert_rate(token, expert[perm], vocab, num_experts)
        rates[str(layer)] = {"same_expert_rate": round(rate, 4), "shuffled_rate": round(shuffled, 4)}
        rates[str(layer)]["tokens_covered"] = round(covered, 4)
        for t, row in zip(frequent, table):
            counts = torch.bincount(expert[token == t], minlength=num_experts)
            row[str(layer)] = [int(counts.argmax()), round(float(counts.max() / counts.sum()), 3)]
    return {"min_count": MIN_COUNT, "layers": rates, "frequent_tokens": table}


@torch.inference_mode()
def top2_recall(pred: HashPredictor, traces: TraceSet, ks=(2, 3, 4), batch_size: int = 256) -> dict[str, dict]:
    """Per layer, the share of the router's top-2 experts (both slots of every real token) that are among the
    predictor's top-k: what `exact` mode must have loaded for a top-2 router."""
    hits = {(layer, k): 0 for layer in pred.arch.layers for k in ks}
    slots = 0
    for start in range(0, len(traces), batch_size):
        batch = traces.subset(torch.arange(start, min(start + batch_size, len(traces))))
        logits = pred(batch.input_ids, batch.attention_mask)  # [layers, batch, seq, E]
        mask = batch.attention_mask.bool()
        slots += 2 * int(mask.sum())
        for i, layer in enumerate(pred.arch.layers):
            truth = batch.top_idx[layer][..., :2][mask]  # [tokens, 2]
            ranked = logits[i][mask].topk(max(ks), dim=-1).indices  # [tokens, max k]
            for k in ks:
                hits[(layer, k)] += int((truth[:, :, None] == ranked[:, None, :k]).any(-1).sum())
    return {str(la): {f"top{k}": round(hits[(la, k)] / max(1, slots), 4) for k in ks} for la in pred.arch.layers}


def predictor_figures(model_dir: Path, traces: TraceSet) -> dict:
    """The shipped predictor's hit rates on `traces`: router top-1 within its top-1/2/3, and top-2 recall."""
    pred, _ = load_predictor(model_dir / "predictor", traces.fingerprint)
    raw = hit_rates(pred, traces, ks=(1, 2, 3))
    rates = {**{k: round(v, 4) for k, v in raw.items() if k.endswith("hit_rate")}, "tokens": raw["tokens"]}
    rates["per_layer"] = {la: {k: round(v, 4) for k, v in r.items()} for la, r in raw["per_layer"].items()}
    rates["top2_recall"] = top2_recall(pred, traces)
    return rates


@torch.no_grad()
def samples(model, tok) -> list[dict]:
    """Greedy continuations (24 tokens, repetition penalty 1.3) of `SAMPLE_PROMPTS`."""
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.3)
        out.append({"prompt": prompt, "text": tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)})
    return out


def measure(model_dir: Path, data_dir: Path, recipe: dict) -> dict:
    """Every figure of the card, for the model in `model_dir` and the held-out split of `recipe`."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    c, block = model.config, recipe["block_tokens"]
    _, wiki = wikitext_split(data_dir / "wikitext2" / "wiki.valid.tokens", recipe["wiki_heldout_articles"])
    sst2, mrpc = (TASKS[t].read(data_dir / t / "dev.tsv") for t in ("sst2", "mrpc"))
    loss, tokens = lm_loss(model, lm_blocks(tok, wiki, block))
    sst2_loss, _ = lm_loss(model, lm_blocks(tok, [e.prompt for e in sst2], block))
    traces = collect_lm_traces(model, tok, wiki, fingerprint(model_dir), top_t=c.num_experts, max_tokens=block)
    files = {str(f.relative_to(model_dir)): f.stat().st_size for f in sorted(model_dir.rglob("*")) if f.is_file()}
    return {
        "fingerprint": traces.fingerprint,
        "parameters": sum(p.numel() for p in model.parameters()),
        "expert_parameters": sum(p.numel() for n, p in model.named_parameters() if ".experts." in n),
        "files": {k: v for k, v in files.items() if k != "README.md"},
        "heldout": {"wikitext_paragraphs": len(wiki), "wikitext_tokens": tokens, "wikitext_loss": round(loss, 4)},
        "wikitext_perplexity": round(math.exp(loss), 2),
        "sst2_dev_prompt_loss": round(sst2_loss, 4),
        "sst2_dev_accuracy": round(label_accuracy(model, tok, sst2, "sst2", block), 4),
        "mrpc_dev_accuracy": round(label_accuracy(model, tok, mrpc, "mrpc", block), 4),
        "mrpc_dev_majority": round(sum(e.label == "equivalent" for e in mrpc) / len(mrpc), 4),
        "routing_wikitext_heldout": routing_figures(traces, c.num_experts, c.num_experts_per_tok),
        "token_routing": token_routing(traces, tok, c.num_experts),
        "predictor_wikitext_heldout": predictor_figures(model_dir, traces),
        "samples": samples(model, tok),
    }


def write_card(model_dir: Path, data_dir: Path) -> dict:
    """Measure the model in `model_dir` (held-out split from its training.json) and write README.md and card.json."""
    training = json.loads((model_dir / "training.json").read_text())
    m = measure(model_dir, data_dir, training["recipe"])
    m["decode_ahead"] = DecodeAhead.report(model_dir / "predictor")  # measured when `sida predictor ahead` built it
    (model_dir / "card.json").write_text(json.dumps(m, indent=1) + "\n")
    (model_dir / "README.md").write_text(render(m, training))
    return m


def render(m: dict, training: dict) -> str:
    """The model card's markdown, from `measure`'s result and the build's training.json."""
    r, t = training["recipe"], training["training"]
    h = m["heldout"]
    lines = [
        "# sida-olmoe-demo",
        "",
        "A small OLMoE-style decoder-only MoE (`OlmoeForCausalLM`: every layer MoE, top-"
        f"{r['top_k']} of {r['num_experts']} experts) trained from",
        "scratch by this project on one CPU thread, so that sida has a decoder-only MoE to serve and measure without",
        "any download. Rebuild (trains, saves, trains the predictor, then measures every figure below on the shipped",
        "files): `python -m sida.demo_model.decoder_lm --data ../shared/data --out models/sida-olmoe-demo`.",
        "",
        "## Shape",
        f"- hidden {r['hidden_size']}, {r['num_layers']} layers, {r['num_heads']} heads, {r['num_experts']} experts "
        f"per layer (SwiGLU, intermediate {r['intermediate_size']}), top-{r['top_k']} routing, tied embeddings.",
        f"- {m['parameters'] / 1e6:.2f} M parameters, {m['expert_parameters'] / 1e6:.2f} M of them in experts; "
        "fp16 safetensors.",
        "- Files: " + ", ".join(f"`{k}` {v / 1e6:.2f} MB" for k, v in m["files"].items()) + ".",
        f"- Fingerprint (config, weight file sizes and contents): `{m['fingerprint']}`.",
        "- Tokenizer: the Switch demo's (word-level BPE, 8k, lower-cased, label words single tokens), except that",
        "  `</s>` is put *before* every input as BOS instead of after it: a prompt ends on its last word.",
        "",
        "## Held-out text (never trained on)",
        f"- WikiText-2 valid, the last {r['wiki_heldout_articles']} articles ({h['wikitext_paragraphs']} paragraphs, "
        f"{h['wikitext_tokens']} scored tokens in {r['block_tokens']}-token rows):",
        f"  **{h['wikitext_loss']:.3f} nats per token, perplexity {m['wikitext_perplexity']:.1f}** (this tokenizer's "
        "tokens).",
        f"- SST-2 dev prompts (`sst2 sentence: ...`, as text): {m['sst2_dev_prompt_loss']:.3f} nats per token.",
        "",
        "## Classification by label-word scoring",
        "The prompt of `sida.offload.tasks` (`sst2 sentence: <s>`, `mrpc sentence1: <s1> sentence2: <s2>`); the",
        "logits of the task's label words at the last prompt position decide.",
        "",
        "| data | accuracy |",
        "|---|---|",
        f"| SST-2 dev (872) | **{m['sst2_dev_accuracy']:.4f}** |",
        f"| MRPC dev (408) | {m['mrpc_dev_accuracy']:.4f} (majority class {m['mrpc_dev_majority']:.4f}) |",
        "",
        *_routing_lines(m, r),
        *_token_lines(m),
        *_predictor_lines(m),
        *_ahead_lines(m),
        "## Greedy samples (24 tokens, repetition penalty 1.3)",
        *[f"- `{s['prompt']}` → `{s['text'].strip()}`" for s in m["samples"]],
        "",
        *_training_lines(r, t),
        "",
        "## Data licences",
        "C4 (ODC-BY), MultiRC train passages (research use, cite Khashabi et al. 2018), WikiText-2 (CC BY-SA 3.0),",
        "SST-2 (cite Socher et al. 2013), MRPC (Microsoft Research Shared Source License: **non-commercial use",
        "only** — this model is trained on it, so the same restriction applies). See `../shared/data/*/SOURCE.md`.",
        "",
    ]
    return "\n".join(lines)


def _routing_lines(m: dict, r: dict) -> list[str]:
    """Expert use and router confidence per layer on the held-out WikiText paragraphs."""
    lines = [
        "## Expert use and router confidence (held-out WikiText-2 paragraphs, real tokens)",
        f"Share = share of the top-{r['top_k']} slots per expert; entropy in bits (even use: "
        f"{math.log2(r['num_experts']):.0f}); router top-1 probability (uniform: {1 / r['num_experts']:.4f}),",
        f"top-1 − top-2 margin, and the probability mass of the top-{r['top_k']} (the experts' output scale: "
        "OLMoE does not renormalise it).",
        "",
        "| layer | tokens | unused experts | largest share | entropy | top-1 prob | margin | top-k mass | shares (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layer, x in m["routing_wikitext_heldout"].items():
        shares = " ".join(f"{100 * s:.1f}" for s in x["slot_share"])
        lines.append(
            f"| {layer} | {x['tokens']} | {x['experts_unused']} | {x['max_share']:.3f} | {x['entropy_bits']:.2f} | "
            f"{x['mean_top1_prob']:.3f} | {x['mean_margin']:.3f} | {x['mean_topk_mass']:.3f} | {shares} |"
        )
    return lines + [""]


def _token_lines(m: dict) -> list[str]:
    """How far the token decides its top-1 expert, and the frequent tokens' dominant experts."""
    t = m["token_routing"]
    layers = list(t["layers"])
    lines = [
        "## Same token, same expert? (held-out WikiText-2, top-1 expert)",
        f"Per layer, over tokens seen at least {t['min_count']} times (BOS left out): the share of a token's "
        "occurrences that go to its most common",
        "expert, against the same rate with the experts shuffled over all occurrences (token-blind routing with the",
        "same loads); the rest of the routing depends on the context.",
        "",
        "| layer | same-expert rate | shuffled | occurrences covered |",
        "|---|---|---|---|",
        *[
            f"| {la} | **{x['same_expert_rate']:.3f}** | {x['shuffled_rate']:.3f} | {x['tokens_covered']:.3f} |"
            for la, x in t["layers"].items()
        ],
        "",
        "Most frequent tokens: dominant top-1 expert per layer (its share of the token's occurrences).",
        "",
        "| token | count | " + " | ".join(f"layer {la}" for la in layers) + " |",
        "|---|---|" + "---|" * len(layers),
    ]
    for row in t["frequent_tokens"]:
        cells = " | ".join(f"e{row[la][0]} ({100 * row[la][1]:.0f}%)" for la in layers)
        lines.append(f"| `{row['token']}` | {row['count']} | {cells} |")
    return lines + [""]


def _predictor_lines(m: dict) -> list[str]:
    """The shipped hash predictor's hit rates on the held-out paragraphs."""
    p = m["predictor_wikitext_heldout"]
    lines = [
        "## Prefill predictor (`predictor/`, SiDA hash function) on held-out WikiText-2",
        "Trained on this model's router traces of C4, SST-2 and MRPC train text (`predictor/predictor.json`).",
        "Hit rate: the router's top-1 expert is among the predictor's top-k; top-2 recall: the share of the router's",
        f"two chosen experts among the predictor's top-k. {p['tokens']} tokens.",
        "",
        "| layer | top-1 hit | top-2 hit | top-3 hit | top-2 recall @2 | @3 | @4 |",
        "|---|---|---|---|---|---|---|",
    ]
    for la, x in p["per_layer"].items():
        rec = p["top2_recall"][la]
        lines.append(
            f"| {la} | {x['top1']:.3f} | {x['top2']:.3f} | {x['top3']:.3f} | {rec['top2']:.3f} | {rec['top3']:.3f} "
            f"| {rec['top4']:.3f} |"
        )
    lines.append(
        f"| all | {p['top1_hit_rate']:.3f} | {p['top2_hit_rate']:.3f} | {p['top3_hit_rate']:.3f} | | | |",
    )
    return lines + [""]


def _ahead_lines(m: dict) -> list[str]:
    """The decode-step predictor's held-out recall against the routers applied ahead."""
    if (a := m.get("decode_ahead")) is None:
        return []
    recall = a["heldout_recall"]
    layers = sorted({int(k.split(".")[1]) for k in recall if "." in k})
    lines = [
        "## Decode-step predictor (`predictor/ahead.safetensors`) on held-out WikiText-2",
        f"Each decode step's experts guessed one layer ahead. Fitted on {a['fit']}; measured on {a['heldout']}.",
        "Recall: the share of the router's two chosen experts among the two guessed.",
        "",
        "| scorer | " + " | ".join(f"layer {la}" for la in layers) + " | mean |",
        "|---|" + "---|" * (len(layers) + 1),
    ]
    for name, label in (("router_ahead", "the next layer's router applied ahead"), ("trained", "trained predictor")):
        cells = " | ".join(f"{recall[f'{name}.{la}']:.3f}" for la in layers)
        lines.append(f"| {label} | {cells} | {recall[name]:.3f} |")
    return lines + [""]


def _training_lines(r: dict, t: dict) -> list[str]:
    """The recipe and the run, from training.json."""
    last = t["history"][-1] if t["history"] else {}
    return [
        "## Training",
        f"- Causal LM on {r['block_tokens']}-token rows of the C4 sample (less its last {r['val_c4_docs']} "
        "documents), the MultiRC train passages and WikiText-2",
        f"  valid (less its last {r['wiki_heldout_articles']} articles), mixed with SST-2 train (less "
        f"{r['val_sst2_rows']} rows; a fresh sample of {r['sst2_rows_per_epoch']} per epoch) and MRPC train",
        "  examples written as prompt + label word + `</s>`: next-token loss on every real token, plus "
        f"{r['label_weight']} x the label word's",
        "  cross-entropy.",
        f"- Load-balancing loss x {r['router_aux_loss_coef']}, computed for each layer on its own (real tokens only) "
        "and averaged: the library's `aux_loss` pools all",
        "  layers' routing first, which lets a layer leave experts without tokens while the pooled counts stay even.",
        f"- AdamW lr {r['lr']}, betas (0.9, 0.95), {r['warmup_steps']} warm-up steps, cosine to {r['min_lr_ratio']} "
        "x lr over the",
        f"  {r['minutes']:g}-minute budget, weight decay {r['weight_decay']} (matrices), grad clip 1.0, batches of "
        f"{r['lm_batch']} LM rows or {r['cls_batch']} prompts; seed {r['seed']}.",
        f"- Run: {t['step']} steps, {t['seconds'] / 60:.1f} minutes on 1 CPU thread (shared machine), "
        f"{t['tokens'] / 1e6:.2f} M tokens, {t['epoch']} full epochs; the final weights are kept.",
        f"- Validation at the end (rows carved from train): C4 loss {last.get('val_c4_loss')}, SST-2 accuracy "
        f"{last.get('val_sst2_acc')}. History: `training.json`.",
    ]
