"""Peak host memory of `sida serve` on one model folder, all-resident against offloaded, and whether the offloaded
server answers `/v1/completions` with the resident server's greedy tokens.

Each configuration is its own `sida serve` process: it starts, answers the same greedy completion requests, and
its peak resident set size (the kernel's VmHWM, loading included) is read before it is stopped. The result also
gives what the budget predicts: dense bytes + budget × expert bytes, from the server's own `/info`.

    .venv/bin/python bench/serve_memory.py --model runs/replicas/olmoe-1b-7b-8l --budget-experts 64 \\
        --out bench/results/serve-memory-olmoe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.live_server import start_serve  # noqa: E402

PROMPTS = ["the city council voted on tuesday to", "a gorgeous , witty , seductive movie"]
SENTENCES = ["a gorgeous , witty , seductive movie .", "a dull , lifeless , boring mess .", "it 's fine ."]


def peak_rss(pid: int) -> int:
    """The process's peak resident set size in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


def serve_once(model: Path, flags: list[str], max_tokens: int) -> dict:
    """Start `sida serve`, ask every prompt greedily, read /info and the peak RSS, stop it."""
    proc, base = start_serve(["--model", str(model), "--hash", "none", "--log-level", "warning", *flags], 900)
    try:
        texts, logprobs = [], []
        for prompt in PROMPTS:  # one prompt a request: no padding, the same kernels on the same rows
            body = {"model": model.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
            r = httpx.post(base + "/v1/completions", json=body, timeout=600)
            r.raise_for_status()
            choice = r.json()["choices"][0]
            texts.append(choice["text"])
            logprobs.append(choice["logprobs"]["token_logprobs"])  # each greedy token's log-prob, step by step
        body = {"model": model.name, "input": SENTENCES}
        r = httpx.post(base + "/v1/classify", json=body, timeout=600)
        r.raise_for_status()
        probs = [d["probs"] for d in r.json()["data"]]
        info = httpx.get(base + "/info", timeout=30).json()
        return {
            "probs": probs,
            "flags": " ".join(flags),
            "peak_rss_bytes": peak_rss(proc.pid),
            "texts": texts,
            "token_logprobs": logprobs,
            "offload": info["offload"],
        }
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--budget-experts", type=int, required=True)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory(dir=REPO / "runs") as experts:
        offload = ["--mode", "exact", "--budget-experts", str(args.budget_experts), "--torch-threads", "2"]
        runs["offloaded_disk"] = serve_once(
            args.model, [*offload, "--tier", "disk", "--expert-dir", experts], args.max_tokens
        )
        runs["resident"] = serve_once(args.model, ["--mode", "resident", "--torch-threads", "2"], args.max_tokens)
    off = runs["offloaded_disk"]["offload"]
    dense = off["device_memory_bytes"]["dense"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(args.model),
        "dense_bytes": dense,
        "expert_bytes": off["expert_bytes"],
        "budget_experts": off["budget_experts"],
        "dense_plus_budget_bytes": dense + off["budget_experts"] * off["expert_bytes"],
        # a random-weight replica's greedy tokens may lie beyond its tokenizer (they decode to ""): each step's
        # log-prob of the token chosen compares the tokens and the computation
        "same_greedy_text": runs["offloaded_disk"]["texts"] == runs["resident"]["texts"],
        "same_greedy_logprobs": runs["offloaded_disk"]["token_logprobs"] == runs["resident"]["token_logprobs"],
        "max_label_prob_diff": max(
            abs(a[k] - b[k]) for a, b in zip(runs["offloaded_disk"]["probs"], runs["resident"]["probs"]) for k in a
        ),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    for name, run in runs.items():
        print(f"{name}: peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB  {run['texts']}")


if __name__ == "__main__":
    main()
