"""Decode as users run it: concurrent client streams of streamed completions against `sida serve`, continuous
against static batching, measured through HTTP in one run; rows merged into `bench/results/cpu-decode.json`.

    .venv/bin/python bench/decode_bench.py --model models/sida-olmoe-demo --budget-fraction 0.5
    .venv/bin/python bench/decode_bench.py --model runs/replicas/olmoe-1b-7b-8l --name olmoe-replica-8l ...

Workload: `--streams` clients, each sending `--requests` streamed completions one after another (a closed loop),
up to `--tokens` tokens each (greedy; `--lengths`: natural, a request ends at eos or `--tokens`; fixed, every
request generates `--tokens`; mixed, each a length drawn from [`--tokens`/8, `--tokens`]), of WikiText sentence
beginnings. Clients do not arrive together:
stream i starts after a delay drawn uniformly (seeded) from one lone request's duration, as independent users do.
Per request the client measures time to first token (the first text event) and time per output token ((latency −
TTFT) / (tokens − 1), as vLLM's benchmark_serving does); tokens/s is every generated token over the wall time.

Each batching runs `--repeats` times, interleaved; a row is the run with the median tokens/s, and lists every run's.
`same_tokens_as_resident`: every request's text equals the text of its prompt run alone on the resident model
(a server with `--mode resident`, one request at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time
from datetime import date
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "loadtest"))

from inputs import wikitext_prompts  # noqa: E402

from tests.live_server import start_serve  # noqa: E402

DATA = REPO.parent / "shared" / "data"
OUT = REPO / "bench" / "results" / "cpu-decode.json"
KEY = ("model", "method", "tier", "budget_fraction", "streams", "batching", "lengths")  # what makes a row


async def stream_one(
    client: httpx.AsyncClient, base: str, model: str, prompt: str, tokens: int, ignore_eos: bool = False
) -> dict:
    """One streamed greedy completion: its text, time to first text event, latency (to `[DONE]`) and the tokens
    generated (the stream's usage)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    body |= {"ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, generated = None, [], None
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"in-stream error: {event['error']}")
            if event.get("usage"):
                generated = event["usage"]["completion_tokens"]
            delta = event["choices"][0]["text"] if event["choices"] else ""
            if delta and first is None:
                first = time.perf_counter() - t0
            text.append(delta)
    latency = time.perf_counter() - t0
    return {"prompt": prompt, "text": "".join(text), "ttft": first if first is not None else latency,
            "latency": latency, "tokens": generated}  # fmt: skip


async def closed_loop(
    base: str, model: str, prompts: list[list[tuple[str, int]]], spread_s: float, seed: int, ignore_eos: bool
):
    """Stream i sends `prompts[i]` ((prompt, max_tokens) pairs) one after another, starting after a uniform delay in
    [0, spread_s)."""
    rng = random.Random(seed)
    delays = [rng.uniform(0, spread_s) for _ in prompts]

    async def stream(i: int) -> list[dict]:
        await asyncio.sleep(delays[i])
        return [await stream_one(client, base, model, p, n, ignore_eos) for p, n in prompts[i]]

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        per_stream = await asyncio.gather(*(stream(i) for i in range(len(prompts))))
        wall = time.perf_counter() - t0
    return [r for rs in per_stream for r in rs], wall


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def serve(model_dir: Path, flags: list[str]):
    proc, base = start_serve(["--model", str(model_dir), "--log-level", "warning", *flags], timeout_s=900)
    info = httpx.get(base + "/info").json()
    return proc, base, info


def reference_texts(args, prompts: list[tuple[str, int]]) -> tuple[dict[str, str], float, int]:
    """Each prompt run alone on the resident model: {prompt: text}, one lone request's seconds, total experts."""
    proc, base, info = serve(args.model, ["--mode", "resident", "--batching", "static"])
    try:
        out = asyncio.run(closed_loop(base, info["model"], [prompts], 0.0, args.seed, args.ignore_eos))[0]
    finally:
        proc.terminate()
        proc.wait()
    lone = sorted(r["latency"] for r in out)[len(out) // 2]
    return {r["prompt"]: r["text"] for r in out}, lone, info["offload"]["total_experts"]


def run_row(
    args, batching: str, prompts: list[list[tuple[str, int]]], reference: dict, spread_s: float, total: int
) -> dict:
    budget = max(1, round(args.budget_fraction * total))
    flags = ["--mode", args.method, "--tier", args.tier, "--budget-experts", str(budget), "--batching", batching]
    proc, base, info = serve(args.model, flags + args.serve_flag)
    try:
        asyncio.run(stream_one_sync_warmup(base, info["model"]))
        loop = closed_loop(base, info["model"], prompts, spread_s, args.seed, args.ignore_eos)
        results, wall = asyncio.run(loop)
    finally:
        proc.terminate()
        proc.wait()
    for r in results:
        if reference[r["prompt"]] != r["text"]:
            print(
                f"differs from resident: {r['prompt']!r}\n  {reference[r['prompt']]!r}\n  {r['text']!r}",
                file=sys.stderr,
            )
    ttft = [r["ttft"] * 1000 for r in results]
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) * 1000 for r in results if r["tokens"] > 1]
    generated = sum(r["tokens"] for r in results)
    return {
        "model": args.name, "method": args.method, "tier": args.tier, "budget_fraction": args.budget_fraction,
        "budget_experts": budget, "streams": len(prompts), "batching": batching,
        "lengths": args.lengths, "max_tokens": args.tokens,
        "requests": len(results), "tokens": generated, "wall_s": round(wall, 2),
        "tokens_per_s": round(generated / wall, 2),
        "ttft_p50_ms": round(percentile(ttft, 50), 1), "ttft_p99_ms": round(percentile(ttft, 99), 1),
        "tpot_p50_ms": round(percentile(tpot, 50), 2), "tpot_p99_ms": round(percentile(tpot, 99), 2),
        "same_tokens_as_resident": all(reference[r["prompt"]] == r["text"] for r in results),
        "same_text_share": round(sum(reference[r["prompt"]] == r["text"] for r in results) / len(results), 3),
        "arrival_spread_s": round(spread_s, 3),
    }  # fmt: skip


async def stream_one_sync_warmup(base: str, model: str) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, base, model, "warm-up", 2, True)


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s, with every run's tokens/s beside it (the machine's spread)."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ranked[len(ranked) // 2], "tokens_per_s_runs": [r["tokens_per_s"] for r in runs]}


def merge(rows: list[dict], header: dict, path: Path) -> None:
    """Replace the rows with the same key in `path` (other benchmarks' rows stay), then write it."""
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    keys = {tuple(r[k] for k in KEY) for r in rows}
    kept = [r for r in old["rows"] if tuple(r.get(k) for k in KEY) not in keys]
    headers = {**old.get("headers", {}), header["run"]: header}
    path.write_text(json.dumps({"rows": kept + rows, "headers": headers}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "models" / "sida-olmoe-demo")
    p.add_argument("--name", help="the rows' model name (default: the folder's)")
    p.add_argument("--method", default="exact", choices=["exact", "predicted"])
    p.add_argument("--tier", default="ram", choices=["ram", "disk"])
    p.add_argument("--budget-fraction", type=float, default=0.5)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--requests", type=int, default=3, help="per stream, one after another")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lengths",
        choices=["natural", "fixed", "mixed"],
        default="natural",
        help="natural: a request ends at eos or --tokens; fixed: every request generates --tokens (ignore_eos); "
        "mixed: each generates a number drawn uniformly (seeded) from [--tokens/8, --tokens] (ignore_eos)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs of each batching; the row is the median's")
    p.add_argument("--serve-flag", action="append", default=[], help="extra `sida serve` flag (repeatable)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.name = args.name or args.model.name
    args.ignore_eos = args.lengths != "natural"
    pool = wikitext_prompts(DATA, seed=args.seed)
    rng = random.Random(args.seed)
    size = (
        (lambda: rng.randint(max(2, args.tokens // 8), args.tokens)) if args.lengths == "mixed" else lambda: args.tokens
    )
    prompts = [[(pool[i * args.requests + j], size()) for j in range(args.requests)] for i in range(args.streams)]
    reference, lone_s, total = reference_texts(args, [x for xs in prompts for x in xs])
    runs = {"static": [], "continuous": []}
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits both
        for batching, got in runs.items():
            got.append(run_row(args, batching, prompts, reference, lone_s, total))
    rows = [median_run(got) for got in runs.values()]
    for r in rows:
        print(json.dumps(r))
    static, cont = rows
    print(
        f"continuous / static tokens/s: {cont['tokens_per_s'] / static['tokens_per_s']:.2f}; "
        f"p99 TTFT {cont['ttft_p99_ms']} ms vs {static['ttft_p99_ms']} ms"
    )
    header = {"run": f"{args.name}-{date.today()}", "date": str(date.today()), "machine": platform.processor()
              or platform.machine(), "command": "bench/decode_bench.py " + " ".join(argv or sys.argv[1:]),
              "lone_request_s": round(lone_s, 3)}  # fmt: skip
    merge(rows, header, args.out)


if __name__ == "__main__":
    main()
