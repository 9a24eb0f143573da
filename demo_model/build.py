"""`sida build-demo`: builds the embedded demo model (a word-level BPE tokenizer and a small Switch
encoder-decoder trained here) stage by stage, or re-measures its model card."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from .card import write_card
from .recipe import DemoRecipe, load_checkpoint
from .stages import consistent, lm, respread, revive, train

# Stages 2-4 as (training.json key, --stage name, function); `--stage X` runs X and the stages after it.
LATER_STAGES = [("stage2", "revive", revive), ("stage3", "consistent", consistent), ("stage4", "respread", respread)]
# Stage 5 runs only when asked for (`--stage lm`), on the model in --out: the shipped model is stages 1-4.
OPTIONAL_STAGES = [("stage5", "lm", lm)]
STAGES = ["all"] + [name for _, name, _ in LATER_STAGES + OPTIONAL_STAGES] + ["card"]


def finalize(out_dir: Path, reports: dict, recipe: DemoRecipe) -> None:
    """Store the chosen checkpoint as fp16 safetensors and record how it was made in training.json."""
    load_checkpoint(out_dir).half().save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "training.json").write_text(json.dumps({"recipe": asdict(recipe), **reports}, indent=1) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The builder's command line (`sida build-demo` passes its own options through)."""
    p = argparse.ArgumentParser(prog="sida build-demo", description=__doc__)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("models/sida-switch-demo"))
    p.add_argument("--epochs", type=int, default=DemoRecipe.epochs)
    p.add_argument("--torch-threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument(
        "--stage",
        choices=STAGES,
        default="all",
        help="all: stages 1-4; revive/consistent/respread: from stage 2/3/4 on, over the model in --out; "
        "lm: stage 5 alone, over the model in --out; card: measure the model in --out and rewrite its model card",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen stages on --out, then save it as fp16 with its training.json (or, `--stage card`, the card)."""
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    if args.stage == "card":
        m = write_card(args.out, args.data)
        print(json.dumps({k: m[k] for k in ("sst2_dev_accuracy", "mrpc_dev_accuracy", "fingerprint")}))
        return
    recipe = DemoRecipe(epochs=args.epochs)
    if args.stage == "all":
        reports = {"stage1": train(args.data, args.out, recipe)}
        # fp16 as shipped: later stages start from these weights, as they do when run alone with --stage
        finalize(args.out, reports, recipe)
        first = 0
    else:
        reports = json.loads((args.out / "training.json").read_text())
        reports.pop("recipe", None)
        names = [name for _, name, _ in LATER_STAGES]
        first = names.index(args.stage) if args.stage in names else len(names)
    chosen = [s for s in OPTIONAL_STAGES if s[1] == args.stage]
    for key, _, run in LATER_STAGES[first:] + chosen:
        reports[key] = run(args.data, args.out, recipe)
    finalize(args.out, reports, recipe)
    print(json.dumps({k: v["best"] for k, v in reports.items()}))
