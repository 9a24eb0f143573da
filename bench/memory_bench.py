"""Peak host memory of `sida eval`, all-resident against offloaded, on a switch-base-N shape with random weights.

Each configuration runs as its own `sida eval` process, which reports its own peak resident set size (the
kernel's VmHWM: a child's ru_maxrss would include this process's memory from before the exec), so loading
counts as much as serving. The disk tier runs twice: with a fresh expert
folder (the expert file is written) and again (it is only read). Every offloaded run's predictions are
compared with the resident run's. The model folder is written once under runs/ (random weights, seed 0,
the demo model's tokenizer, whose ids fit the vocabulary).

    .venv/bin/python bench/memory_bench.py --experts 8 --budget-experts 24
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.switch_shapes import switch_base_model  # noqa: E402

DEMO = REPO / "models" / "sida-switch-demo"
DATA = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"
SIDA = [sys.executable, "-m", "sida.server.cli"]


def model_folder(num_experts: int, root: Path) -> Path:
    """switch-base-N with random weights as a local Hugging Face folder, written once."""
    out = root / f"switch-base-{num_experts}-random"
    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    model = switch_base_model(num_experts)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, tmp / name)
    tmp.replace(out)
    return out


def run(name: str, model: Path, flags: list[str], out: Path, limit: int) -> dict:
    """One `sida eval` process: its peak RSS, wall time and summary."""
    argv = SIDA + ["eval", "--model", str(model), "--task", "sst2", "--data", str(DATA), "--limit", str(limit)]
    argv += ["--json", "--hash", "none", "--out", str(out)] + flags
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
        raise SystemExit(f"{name} failed: {last}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "run": name,
        "flags": " ".join(flags),
        "peak_rss_bytes": summary["peak_rss_bytes"],
        "seconds": round(time.perf_counter() - t0, 1),
        "accuracy": summary["accuracy"],
        "device_memory_bytes": summary.get("device_memory_bytes"),
        "host_memory_bytes": summary.get("host_memory_bytes"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=8, help="switch-base-N")
    ap.add_argument("--budget-experts", type=int, default=24)
    ap.add_argument("--limit", type=int, default=64, help="SST-2 dev sentences")
    ap.add_argument("--root", type=Path, default=REPO / "runs", help="where the model folder is written")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory.json")
    args = ap.parse_args(argv)

    model = model_folder(args.experts, args.root)
    budget = ["--budget-experts", str(args.budget_experts)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        experts = tmp / "experts"
        plans = [
            ("resident", ["--mode", "resident"]),
            ("ram tier", ["--mode", "exact", *budget]),
            (
                "disk tier, fresh expert folder",
                ["--mode", "exact", "--tier", "disk", *budget, "--expert-dir", str(experts)],
            ),
            ("disk tier, again", ["--mode", "exact", "--tier", "disk", *budget, "--expert-dir", str(experts)]),
        ]
        rows = []
        for i, (name, flags) in enumerate(plans):
            rows.append(run(name, model, flags, tmp / f"{i}.jsonl", args.limit))
            rows[-1]["same_predictions_as_resident"] = (tmp / f"{i}.jsonl").read_bytes() == (
                tmp / "0.jsonl"
            ).read_bytes()
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["peak_rss_bytes"]
    for r in rows:
        r["rss_vs_resident"] = round(r["peak_rss_bytes"] / base, 3)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": f"switch-base-{args.experts} shape, random weights, float32",
        "model_bytes": (model / "model.safetensors").stat().st_size,
        "budget_experts": args.budget_experts,
        "sentences": args.limit,
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
