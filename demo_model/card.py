"""Measures the demo model and writes its model card (README.md next to the weights, and card.json).

Every figure in the card is measured on the files as shipped (fp16 weights loaded as fp32), or read from the
training.json the build wrote.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from sida.offload.model_loader import LoadedModel, load_model
from sida.offload.runner import Runner
from sida.offload.sampling import Sampling
from sida.offload.task_accuracy import evaluate
from sida.offload.tasks import TASKS
from sida.predictor.corpora import read_wikitext_paragraphs
from sida.predictor.traces import LayerTrace, classification_batches, expert_usage, lm_batches, trace_batch


def routing_report(loaded: LoadedModel, batches) -> dict[int, dict]:
    """Per MoE layer, over the real tokens of `batches`: experts used, largest share, router confidence, histogram."""
    traces: list[list[LayerTrace]] = [trace_batch(loaded, *b) for b in batches]
    usage = expert_usage(traces, loaded.config.num_experts)
    report = {}
    for layer, counts in usage.items():
        rows = [t for batch in traces for t in batch if t.layer == layer]
        total = int(counts.sum())
        report[layer] = {
            "stack": rows[0].stack,
            "tokens": total,
            "experts_used": int((counts > 0).sum()),
            "max_share": round(float(counts.max()) / max(1, total), 4),
            "mean_top1_prob": round(float(torch.cat([t.top_prob for t in rows]).mean()), 4),
            "mean_margin": round(float(torch.cat([t.margin for t in rows]).mean()), 4),
            "histogram": counts.tolist(),
        }
    return report


# Completion samples for the card: prompts written for it (not from the training text), with the settings the
# README's completion example uses
SAMPLE_PROMPTS = ("The city council met on Tuesday to discuss", "This movie is", "The best way to learn a language is")
SAMPLE_SETTINGS = Sampling(temperature=0.0, repetition_penalty=1.3)


@torch.no_grad()
def continuation_loss(loaded: LoadedModel, batches) -> float:
    """Mean cross-entropy per continuation token of teacher-forced `lm_batches` (each row's last target token is
    not in its decoder input, so it is not scored)."""
    total, tokens = 0.0, 0
    for enc_ids, enc_mask, dec_ids, dec_mask in batches:
        logits = loaded.model(input_ids=enc_ids, attention_mask=enc_mask, decoder_input_ids=dec_ids).logits
        target, mask = dec_ids[:, 1:], dec_mask[:, 1:].bool()  # step t predicts decoder input t+1
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), target[mask], reduction="sum"))
        tokens += int(mask.sum())
    return total / max(1, tokens)


def completion_report(runner: Runner, wiki: list[str]) -> dict:
    """WikiText-2 continuation loss (text never trained on) and the sample completions of `SAMPLE_PROMPTS`."""
    loss = continuation_loss(runner.loaded, lm_batches(runner, wiki))
    done = runner.complete(list(SAMPLE_PROMPTS), max_new_tokens=24, sampling=SAMPLE_SETTINGS)
    return {
        "wikitext_loss": round(loss, 4),
        "wikitext_perplexity": round(float(torch.tensor(loss).exp()), 1),
        "samples": [{"prompt": p, "text": c.text} for p, c in zip(SAMPLE_PROMPTS, done)],
    }


def measure(model_dir: Path, data_dir: Path) -> dict:
    """Dev accuracies, size, files, fingerprint and routing of the model in `model_dir` (the card's figures)."""
    torch.manual_seed(0)
    loaded = load_model(model_dir)
    runner = Runner(loaded)
    sst2 = evaluate(runner, "sst2", data_dir / "sst2" / "dev.tsv", progress=False)
    mrpc = evaluate(runner, "mrpc", data_dir / "mrpc" / "dev.tsv", progress=False)
    sst2_prompts = [e.prompt for e in TASKS["sst2"].read(data_dir / "sst2" / "dev.tsv")]
    mrpc_dev = TASKS["mrpc"].read(data_dir / "mrpc" / "dev.tsv")
    wiki = read_wikitext_paragraphs(data_dir / "wikitext2" / "wiki.valid.tokens", 600)
    random.Random(0).shuffle(wiki)
    layers = loaded.adapter.moe_layers(loaded.model)
    expert_params = sum(p.numel() for layer in layers for e in layer.experts for p in e.parameters())
    files = {f.name: f.stat().st_size for f in sorted(model_dir.iterdir()) if f.is_file() and f.name != "README.md"}
    return {
        "fingerprint": loaded.fingerprint,
        "sst2_dev_accuracy": round(sst2.accuracy, 4),
        "mrpc_dev_accuracy": round(mrpc.accuracy, 4),
        "mrpc_dev_majority": round(sum(e.label == "equivalent" for e in mrpc_dev) / mrpc.examples, 4),
        "sst2_dev_seconds": round(sst2.seconds, 2),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "expert_parameters": expert_params,
        "files": files,
        "routing_sst2_dev": routing_report(loaded, classification_batches(runner, sst2_prompts)),
        "routing_wikitext_valid": routing_report(loaded, lm_batches(runner, wiki)),
        "completion": completion_report(runner, wiki),
        "layers": [{"index": la.index, "name": la.name} for la in layers],
    }


def write_card(model_dir: Path, data_dir: Path) -> dict:
    """Measure the model in `model_dir` and write README.md (the card) and card.json (the measurements) there."""
    m = measure(model_dir, data_dir)
    training_path = model_dir / "training.json"
    training = json.loads(training_path.read_text()) if training_path.is_file() else {}
    (model_dir / "README.md").write_text(render(m, training))
    (model_dir / "card.json").write_text(json.dumps(m, indent=1) + "\n")
    return m


def render(m: dict, training: dict) -> str:
    """The model card's markdown, from `measure`'s result and the build's training.json."""
    c = training.get("recipe", {})
    lines = [
        "# sida-switch-demo",
        "",
        "A small Switch Transformer (encoder-decoder, top-1 MoE) trained from scratch on 2 CPU cores by this",
        "project, so that sida has a real trained MoE to serve and measure without any download.",
        "Rebuild: `make demo-model` (trains, then runs `make demo-card`, which measured every figure below).",
        "",
        *_shape_lines(m, c),
        "## Tasks and prompts",
        "- `sst2 sentence: <sentence>` → `positive` | `negative`",
        "- `mrpc sentence1: <s1> sentence2: <s2>` → `equivalent` | `not_equivalent`",
        "- completion: a C4 text prefix → the next 32 tokens (prefix-LM), so decoder MoE layers see real text.",
        "- Labels are scored by the first decoder step's logits over the task's label words (one token each).",
        "",
        "## Accuracy (measured on the shipped weights)",
        "| data | examples | accuracy |",
        "|---|---|---|",
        f"| SST-2 dev (`../shared/data/sst2/dev.tsv`) | 872 | **{m['sst2_dev_accuracy']:.4f}** |",
        f"| MRPC dev (`../shared/data/mrpc/dev.tsv`) | 408 | {m['mrpc_dev_accuracy']:.4f} "
        f"(majority class: {m['mrpc_dev_majority']:.4f}) |",
        "",
        f"SST-2 dev takes {m['sst2_dev_seconds']:.1f} s on this machine (`sida eval`, 2 CPU threads).",
        "",
        *_routing_lines(m, c),
        *_completion_lines(m),
        *_training_lines(training),
        "",
        "## Data licences",
        "SST-2 (cite Socher et al. 2013), MRPC (Microsoft Research Shared Source License: **non-commercial use",
        "only** — this model is trained on it, so the same restriction applies), C4 (ODC-BY), WikiText-2",
        "(CC BY-SA 3.0, used only for measurement)"
        + (
            ", MultiRC train passages (stage 5; no licence file upstream: research use, cite Khashabi et al. 2018)"
            if "stage5" in training
            else ""
        )
        + ". See `../shared/data/*/SOURCE.md`.",
        "",
    ]
    return "\n".join(lines)


def _completion_lines(m: dict) -> list[str]:
    """The card's "Completion" section: WikiText-2 continuation loss and the sample completions."""
    c = m.get("completion")
    if not c:
        return []
    return [
        "## Completion (measured on the shipped weights)",
        f"- WikiText-2 valid (never trained on), first 40 words → next 30, teacher-forced: {c['wikitext_loss']:.3f} "
        f"nats per token, perplexity {c['wikitext_perplexity']:.0f} (word-level BPE tokens of this tokenizer).",
        "- Greedy with `repetition_penalty` 1.3, 24 tokens (the README's example):",
        *[f"  - `{s['prompt']}` → `{s['text'].strip()}`" for s in c["samples"]],
        "",
    ]


def _shape_lines(m: dict, c: dict) -> list[str]:
    """The card's "Shape" section: dimensions, MoE layers, size, files and fingerprint."""
    return [
        "## Shape",
        f"- d_model {c.get('d_model')}, d_ff {c.get('d_ff')}, {c.get('num_heads')} heads x d_kv {c.get('d_kv')}, "
        f"{c.get('num_layers')}+{c.get('num_layers')} blocks, {c.get('num_experts')} experts per MoE layer.",
        "- MoE layers: " + ", ".join(f"{la['index']} = `{la['name']}`" for la in m["layers"]) + ".",
        f"- {m['parameters'] / 1e6:.2f} M parameters, {m['expert_parameters'] / 1e6:.2f} M of them in experts; "
        "stored as fp16 safetensors.",
        "- Files: " + ", ".join(f"`{k}` {v / 1e6:.2f} MB" for k, v in m["files"].items()) + ".",
        f"- Fingerprint (config, weight file sizes and contents): `{m['fingerprint']}`.",
        "",
    ]


def _routing_lines(m: dict, c: dict) -> list[str]:
    """The card's "Routing" section: one table per data set, one row per MoE layer."""
    lines = [
        "## Routing (real tokens only, padding excluded)",
        "Router confidence: mean top-1 router probability (uniform = "
        f"{1 / (c.get('num_experts') or 16):.4f}) and mean top-1 minus top-2 margin.",
        "",
    ]
    for title, key in (
        ("SST-2 dev prompts", "routing_sst2_dev"),
        ("WikiText-2 valid, prefix → continuation (teacher-forced)", "routing_wikitext_valid"),
    ):
        lines += [
            f"### {title}",
            "| layer | stack | tokens | experts used | largest share | mean top-1 prob | mean margin "
            "| tokens per expert |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for layer, r in sorted(m[key].items(), key=lambda kv: int(kv[0])):
            hist = " ".join(str(x) for x in r["histogram"])
            lines.append(
                f"| {layer} | {r['stack']} | {r['tokens']} | {r['experts_used']} | {r['max_share']:.3f} | "
                f"{r['mean_top1_prob']:.3f} | {r['mean_margin']:.3f} | {hist} |"
            )
        lines.append("")
    return lines + [
        "On SST-2 the decoder sees a single token (the start token) per example, so decoder layers route few",
        "experts there; their balance is measured on the WikiText continuation rows.",
        "",
    ]


def _training_lines(training: dict) -> list[str]:
    """The card's "Training" section: the recipe and what each stage did, from training.json."""
    c = training.get("recipe", {})
    s1, s2, s3, s4, s5 = (training.get(f"stage{i}", {}) for i in range(1, 6))
    return [
        "## Training",
        f"- Data: SST-2 train (less {c.get('heldout')} rows held out to choose the checkpoint), MRPC train,",
        "  C4 sample (prefix-LM). Tokenizer: word-level BPE (8k) trained on the same text, lower-cased;",
        "  label words are single tokens.",
        f"- AdamW lr {c.get('lr')}, betas (0.9, 0.98), {c.get('warmup_steps')} warm-up steps then linear decay, "
        f"weight decay {c.get('weight_decay')}, grad clip 1.0, dropout {c.get('dropout')}, batch {c.get('batch_size')} "
        f"bucketed by length, {c.get('epochs')} epochs, seed {c.get('seed')}.",
        f"- Routers re-initialised with std {c.get('router_init_std')}; aux (load-balancing) loss coefficient "
        f"{c.get('router_aux_loss_coef')}, z-loss {c.get('router_z_loss_coef')}.",
        f"- Weights: EMA (decay {c.get('ema_decay')}); the EMA checkpoint with the best held-out SST-2 accuracy "
        f"was kept (stage 1: step {s1.get('best', {}).get('step')}, held-out accuracy "
        f"{s1.get('best', {}).get('heldout_acc', 0):.4f}).",
        f"- Stage 1: {s1.get('steps')} steps in {s1.get('minutes')} minutes on 2 CPU cores "
        "(other work was running on the same cores).",
        *_stage2_lines(s2, c),
        *_stage3_lines(s3, c),
        *_stage4_lines(s4, c),
        *_stage5_lines(s5, c),
        "- History of every stage: `training.json`.",
    ]


def _stage2_lines(s2: dict, recipe: dict) -> list[str]:
    """What stage 2 (`stages.revive`) did: split idle decoder experts, fine-tune, split again."""
    used = s2.get("decoder_experts_used", {})
    return [
        "- Stage 2: decoder MoE layers see one token per classification example, so the per-sequence",
        "  load-balancing loss left some decoder experts unused after stage 1 "
        f"({used.get('before')} experts used per decoder block, on C4",
        "  continuations). Each unused expert got a copy of a busy one (weights plus 1% noise) and the pair's",
        "  router rows became w ± δ, δ along the busy expert's tokens' main direction of variation, so that",
        f"  they share its tokens; then a fine-tune of {recipe.get('revive_epochs')} epoch at lr "
        f"{recipe.get('revive_lr')} ({s2.get('steps')} steps, {s2.get('minutes')} minutes), and the same split "
        "once more for experts",
        f"  the fine-tune left unused ({s2.get('split_after_finetune')}). After it: "
        f"{used.get('after')} experts used, held-out accuracy "
        f"{s2.get('heldout_acc_final', s2.get('best', {}).get('heldout_acc', 0)):.4f}.",
    ]


def _stage3_lines(s3: dict, recipe: dict) -> list[str]:
    """What stage 3 (token-consistent encoder routing, `stages.consistent`) did, round by round."""
    rounds = s3.get("rounds") or []
    if not rounds:
        return []
    steps = []
    for w, r in zip(recipe.get("consistent_weights", []), rounds):
        conf = r["router_confidence"]["after"]
        agree = r["agreement_with_assignment"]
        steps.append(
            f"weight {w}: mean top-1 router probability "
            + "/".join(f"{conf[b]['mean_top1_prob']:.2f}" for b in sorted(conf))
            + ", agreement with the assignment "
            + "/".join(f"{agree[b]:.3f}" for b in sorted(agree))
            + ", experts used "
            + "/".join(str(conf[b]["experts_used"]) for b in sorted(conf))
            + f", held-out accuracy {r['best']['heldout_acc']:.3f}"
        )
    before = rounds[0]["router_confidence"]["before"]
    sequences = f"{recipe.get('consistent_sequences', 0):,}".replace(",", " ")
    return [
        "- Stage 3: stages 1–2 leave the encoder routers near-uniform (mean top-1 router probability "
        + "/".join(f"{before[b]['mean_top1_prob']:.2f}" for b in sorted(before))
        + "), so a token's",
        "  expert flips with small changes of context, unlike trained Switch checkpoints whose encoder routing",
        f"  follows token identity. Each encoder MoE layer's routing was counted per token id on {sequences}",
        "  training inputs and each token assigned the expert of its highest mean router logit plus a per-expert",
        f"  offset that keeps every expert within {recipe.get('consistent_slack')}x of an even share; the model was "
        "fine-tuned one epoch per round",
        f"  at lr {recipe.get('consistent_lr')} with its task loss + weight x the routers' cross-entropy against "
        "the assignment (real tokens;",
        "  re-derived every "
        f"{recipe.get('consistent_refresh')} steps) + the load-balancing loss. Rounds: " + "; ".join(steps) + ".",
        "  The router still chooses from the hidden state; the routing table above is what it does.",
    ]


def _stage4_lines(s4: dict, recipe: dict) -> list[str]:
    """What stage 4 (`stages.respread`) did: stage 2's split again, after stage 3, without a fine-tune."""
    if not s4:
        return []
    used, acc = s4["decoder_experts_used"], s4["heldout_acc"]

    def per_block(d: dict) -> str:
        return "/".join(str(d[b]) for b in sorted(d, key=int))

    rounds = "; ".join(
        f"round {i + 1}: " + ", ".join(f"{len(split[b])} in block {b}" for b in sorted(split, key=int) if split[b])
        for i, split in enumerate(s4["split"])
    )
    return [
        "- Stage 4: stage 3's fine-tune left decoder experts idle again "
        f"({per_block(used['before'])} of {recipe.get('num_experts')} used per decoder MoE block on C4 continuations).",
        "  Stage 2's split was applied, with no fine-tune, to every expert with under 5% of an even share of the",
        f"  tokens ({rounds}; a split can leave the copy without tokens, so up to three rounds): a copy and its",
        "  donor compute almost what the donor did, and the encoder is untouched. After it: "
        f"{per_block(used['after'])} experts used, held-out accuracy {acc['before']:.3f} → {acc['after']:.3f}.",
    ]


def _stage5_lines(s5: dict, recipe: dict) -> list[str]:
    """What stage 5 (`stages.lm`) did: the decoder and the shared embedding fine-tuned on text, the encoder's
    blocks frozen."""
    if not s5:
        return []
    start, best, final, pairs = s5["start"], s5["best"], s5["final"], s5.get("pairs", {})
    return [
        "- Stage 5: stages 1–4 gave the prefix-LM a few hundred steps, and it stayed at about the tokens' unigram",
        f"  entropy (held-out C4 loss {start['heldout_lm_loss']:.2f} nats per token). The decoder and the shared "
        "embedding (also the output",
        f"  layer) were fine-tuned {recipe.get('lm_epochs')} epochs at lr {recipe.get('lm_lr')} ({s5.get('steps')} "
        f"steps, {s5.get('minutes')} minutes) with the encoder's blocks frozen, on prefix → next "
        f"{recipe.get('lm_target')} tokens,",
        f"  prefixes of {recipe.get('lm_short_prefix')} tokens cut {recipe.get('lm_passes')} times at random from C4 "
        f"(less its last {recipe.get('lm_heldout_docs')} documents) and the MultiRC train passages,",
        f"  with {pairs.get('sst2')} SST-2 and {pairs.get('mrpc')} MRPC rows mixed in. Kept: the EMA checkpoint "
        "with the lowest held-out C4 loss whose",
        f"  held-out accuracy stayed within {recipe.get('lm_acc_drop')} of the start (step {best.get('step')}): "
        f"held-out C4 loss {start['heldout_lm_loss']:.2f} → {final['heldout_lm_loss']:.2f}, held-out accuracy "
        f"{start['heldout_acc']:.3f} → {final['heldout_acc']:.3f};",
        f"  decoder experts used after it: {s5.get('decoder_experts_used')}. The encoder reads the moved embedding, "
        "so the predictor must be retrained (`make demo-predictor`).",
    ]
