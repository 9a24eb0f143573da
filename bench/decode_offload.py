"""Decode under a device budget: `--streams` sequences generating `--tokens` tokens each (greedy, `ignore_eos`) in
one continuous decode batch, in process, for every method on the same prompts; rows merged into
`bench/results/cpu-decode.json` beside the batching rows of `decode_bench.py`.

    .venv/bin/python bench/decode_offload.py --model models/sida-olmoe-demo --budgets 0.1,0.25,0.5 --streams 1,4
    .venv/bin/python bench/decode_offload.py --model runs/replicas/olmoe-1b-7b-8l --name olmoe-replica-8l \\
        --tier disk --budgets 0.25 --streams 1

Methods: `resident` (every expert in the model), `accelerate` (`dispatch_model` with whole layers' experts modules
offloaded to disk, the budget's share of layers kept), `lru` and `layered` (experts loaded when the router asks, no
guess), `static` (the experts most used on calibration text kept resident, the rest on demand: llama.cpp's
`--n-cpu-moe`, KTransformers' GPU-expert mask), `exact` (sida: the prompt's hash table where the model ships a
predictor, and each decode step's experts guessed a layer ahead, `offload/lookahead.py`) and `exact+layered` (the
same with the layered eviction policy instead of lru); `oracle` is `exact` guessing with the router's own choices of
each decode step, recorded from the reference run (the most decode-step prediction can win). Every sida method gets
the same slots. Measured prompts are
the beginnings of the first WikiText-2 valid paragraphs (held out from `sida predictor ahead`); `static`'s counts
come from generating after C4 document beginnings.

Per row: tokens/s over the whole requests (prefill and decode), bytes copied into slots (`bytes_read`: from disk on
the disk tier), `stall_share` (time the compute waited for copies over the wall time), `decode_recall` and
`prefetch_precision` (exact), whether every token equals the resident model's with transformers' `eager` experts
(`eager_reference`), and `per_layer`: each MoE layer's stall, lookups and bytes by outcome (`layer_breakdown`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.decode_bench import DATA, OUT, merge  # noqa: E402
from bench.offload_bench import _drop_from_page_cache, device_read_bytes  # noqa: E402
from sida.offload.adapters import capture_routing  # noqa: E402
from sida.offload.decode_batch import DecodeBatch, Sequence  # noqa: E402
from sida.offload.engine import OffloadConfig, OffloadEngine  # noqa: E402
from sida.offload.model_loader import load_model  # noqa: E402
from sida.offload.runner import Runner  # noqa: E402
from sida.predictor.corpora import beginnings, read_c4_texts, read_wikitext_paragraphs  # noqa: E402
from sida.predictor.decode_ahead import DecodeAhead  # noqa: E402

METHODS = ("resident", "accelerate", "lru", "layered", "static", "exact", "exact+layered", "oracle")


def generate(runner: Runner, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], float]:
    """All `prompts` as one continuous batch of `tokens` tokens each: (each one's tokens, wall seconds)."""
    seqs = [Sequence(ids, tokens, ignore_eos=True) for ids in prompts]
    batch = DecodeBatch(runner, kv_per_token=1)  # no bound: the streams are the batch
    t0 = time.perf_counter()
    batch.admit(seqs, runner.pad([s.ids for s in seqs]))
    while batch.running:
        batch.step()
    return [s.generated for s in seqs], time.perf_counter() - t0


def accelerate_runner(args, fraction: float) -> Runner:
    """accelerate's `dispatch_model`: the budget's share of MoE layers keeps its experts module in memory, the others
    are offloaded to disk (one fused module per layer: accelerate moves modules whole), read for every call and
    dropped from the page cache after it, so that each call reads the disk."""
    from accelerate import dispatch_model

    loaded = load_model(args.model, "auto", "cpu", "device")
    layers = loaded.adapter.moe_layers(loaded.model)
    keep = round(fraction * len(layers))
    folder = args.expert_dir or REPO / "runs" / "accelerate-offload"
    folder = folder / f"{args.name}-{fraction}"
    device_map = {"": "cpu"}
    for la in layers[keep:]:
        device_map[la.name] = "disk"
    model = dispatch_model(loaded.model, device_map=device_map, main_device="cpu", offload_dir=str(folder))
    for la in layers[keep:]:
        files = sorted(folder.glob(f"{la.name}.*.dat"))
        model.get_submodule(la.name).register_forward_hook(lambda *_, files=files: _drop_from_page_cache(files))
    return Runner(loaded)


def build(args, method: str, fraction: float) -> Runner:
    if method == "accelerate":
        return accelerate_runner(args, fraction)
    if method == "resident":
        loaded = load_model(args.model, "auto", "cpu", "device")
        return Runner(loaded, engine=OffloadEngine(loaded, OffloadConfig(mode="resident"), torch.device("cpu")))
    loaded = load_model(args.model, "auto", "cpu", "host")
    total = len(loaded.adapter.moe_layers(loaded.model)) * loaded.adapter.num_experts(loaded.model)
    policy = {"layered": "layered", "static": "static", "exact+layered": "layered"}.get(method, "lru")
    cfg = OffloadConfig(
        mode="exact", budget_experts=max(1, round(fraction * total)), policy=policy, tier=args.tier,
        expert_dir=args.expert_dir,
    )  # fmt: skip
    engine = OffloadEngine(loaded, cfg, torch.device("cpu"))
    if not method.startswith(("exact", "oracle")):
        engine.context.lookahead = None  # the baselines load what the router asks for, when it asks
    else:  # the trained decode-step predictor where the model ships one, else the routers applied ahead
        ahead = DecodeAhead.load(args.model / "predictor", loaded.fingerprint)
        if ahead is not None:
            engine.set_lookahead_scorer(ahead)
    return Runner(loaded, engine=engine)


def calibrate(runner: Runner, prompts: list[str], tokens: int) -> Counter:
    """(layer, expert) → how often the router chose it, over generating from the calibration prompts."""
    counts: Counter = Counter()
    k = int(getattr(runner.model.config, "num_experts_per_tok", 1))
    layers = runner.loaded.adapter.moe_layers(runner.model)
    with capture_routing(layers) as capture:
        generate(runner, runner.tokenize(prompts), tokens)
    for layer, records in capture.records.items():
        for rec in records:
            for e in rec.logits.reshape(-1, rec.logits.shape[-1]).topk(k, -1).indices.reshape(-1).tolist():
                counts[(layer, e)] += 1
    return counts


def run_cell(
    args, method: str, fraction: float, streams: int, texts: list[str], calibration: list[str], reference
) -> tuple[dict, list[list[int]]]:
    """One method at one budget and stream count: its row, and the tokens each stream generated."""
    runner = build(args, method, fraction)
    engine = runner.engine
    if engine is None:  # accelerate: the model as dispatch_model left it
        return accelerate_row(args, runner, fraction, streams, texts, reference)
    prompts = runner.tokenize(texts[:streams])
    if method == "static":
        k = int(getattr(runner.model.config, "num_experts_per_tok", 1))
        counts = calibrate(runner, calibration, min(args.tokens, 16))
        engine.keep_hot(counts, on_demand_slots=min(engine.num_slots // 2, k * streams))
    generate(runner, [prompts[0][:4]], 2)  # warm-up: the first forward outside the measured time
    if method == "oracle":  # after the warm-up, whose steps are not the measured ones
        engine.set_lookahead_scorer(OracleScorer(args.routes[streams]))
    engine.reset_stats()
    tokens, wall = generate(runner, prompts, args.tokens)
    s = engine.summary()
    engine.close()  # the disk tier's I/O threads and file descriptors, before the next cell's engine
    same = None if reference is None else tokens == reference
    per_layer = layer_breakdown(engine) if engine.cache is not None else None
    return {
        "model": args.name, "method": method, "tier": args.tier if method != "resident" else "device",
        "budget_fraction": fraction if method != "resident" else 1.0, "budget_experts": engine.num_slots,
        "streams": streams, "batching": "continuous", "lengths": "fixed", "max_tokens": args.tokens,
        "tokens_per_s": round(streams * args.tokens / wall, 3), "wall_s": round(wall, 3),
        "bytes_read": s["expert_bytes_moved"], "stall_share": round(s.get("stall_seconds", 0.0) / wall, 4),
        "decode_recall": s.get("decode_recall", {}).get("all"), "prefetch_precision": s.get("prefetch_precision"),
        "cache_hit_rate": s["cache_hit_rate"], "on_demand_loads": s["on_demand_loads"],
        "same_tokens_as_resident": same, "ttft_p50_ms": None, "ttft_p99_ms": None,
        "tpot_p50_ms": round(wall / args.tokens * 1000, 2), "tpot_p99_ms": None, "per_layer": per_layer,
    }, tokens  # fmt: skip


def layer_breakdown(engine: OffloadEngine) -> list[dict]:
    """Where a cell's copy time and bytes went, per MoE layer: seconds the layer waited for copies, lookups found
    resident or loaded on demand, and bytes read by outcome (on demand; prefetched and used; prefetched and
    evicted or failed unused)."""
    s, nbytes = engine.cache.stats, engine.expert_bytes
    return [
        {
            "layer": layer,
            "stall_s": round(s.stall_by_layer[layer], 4),
            "hits": s.hits_by_layer[layer],
            "on_demand": s.misses_by_layer[layer],
            "on_demand_bytes": s.misses_by_layer[layer] * nbytes,
            "prefetch_used_bytes": s.prefetch_used_bytes[layer],
            "prefetch_unused_bytes": s.prefetch_unused_bytes[layer],
        }  # fmt: skip
        for layer in range(engine.num_layers)
    ]


def eager_reference(args, prompts_text: list[str], streams: list[int]) -> tuple[dict, dict]:
    """The resident model's greedy tokens with transformers' `eager` experts (one expert at a time, as sida runs
    them): the reference every lossless method's tokens must equal, bit for bit also in bfloat16, where the fused
    `grouped_mm` kernel of the speed row sums in another order. Also each decode step's router logits per MoE layer
    (the `oracle` method's guesses): {streams: tokens}, {streams: {layer: [[rows, experts] per decode step]}}."""
    loaded = load_model(args.model, "auto", "cpu", "device")
    loaded.model.set_experts_implementation("eager")
    runner = Runner(loaded, engine=OffloadEngine(loaded, OffloadConfig(mode="resident"), torch.device("cpu")))
    tokens, routes = {}, {}
    for n in streams:
        with capture_routing(loaded.adapter.moe_layers(loaded.model)) as capture:
            tokens[n], _ = generate(runner, runner.tokenize(prompts_text[:n]), args.tokens)
        routes[n] = {
            layer: [r.logits.reshape(n, -1) for r in records if r.logits.shape[1] == 1]  # the decode steps
            for layer, records in capture.records.items()
        }
    return tokens, routes


class OracleScorer:
    """The `LayerAheadScorer` that knows the future: the router's own logits of each decode step, replayed in order
    (the n-th call for a layer is its n-th decode step). The ceiling of decode-step prediction."""

    def __init__(self, steps: dict[int, list[torch.Tensor]]):
        self.steps = steps
        self.calls: Counter = Counter()

    def __call__(self, layer: int, previous: torch.Tensor | None, token_emb: torch.Tensor) -> torch.Tensor:
        i, self.calls[layer] = self.calls[layer], self.calls[layer] + 1
        steps = self.steps[layer]
        return steps[i] if i < len(steps) else torch.zeros(token_emb.shape[0], steps[0].shape[-1])


def accelerate_row(args, runner: Runner, fraction: float, streams: int, texts: list[str], reference):
    """The accelerate cell's row: disk bytes read by this process while it generated, no cache statistics."""
    prompts = runner.tokenize(texts[:streams])
    generate(runner, [prompts[0][:4]], 2)
    before = device_read_bytes()
    tokens, wall = generate(runner, prompts, args.tokens)
    return {
        "model": args.name, "method": "accelerate", "tier": "disk", "budget_fraction": fraction,
        "budget_experts": None, "streams": streams, "batching": "continuous", "lengths": "fixed",
        "max_tokens": args.tokens, "tokens_per_s": round(streams * args.tokens / wall, 3), "wall_s": round(wall, 3),
        "bytes_read": device_read_bytes() - before, "stall_share": None, "decode_recall": None,
        "prefetch_precision": None, "cache_hit_rate": None, "on_demand_loads": None,
        "same_tokens_as_resident": None if reference is None else tokens == reference,
        "ttft_p50_ms": None, "ttft_p99_ms": None, "tpot_p50_ms": round(wall / args.tokens * 1000, 2),
        "tpot_p99_ms": None,
    }, tokens  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "models" / "sida-olmoe-demo")
    p.add_argument("--name")
    p.add_argument("--tier", default="ram", choices=["ram", "disk"])
    p.add_argument("--expert-dir", type=Path, help="tier disk: where the expert file is written once")
    p.add_argument("--budgets", default="0.1,0.25,0.5")
    p.add_argument("--streams", default="1,4")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.name = args.name or args.model.name
    torch.set_num_threads(args.threads)
    streams = [int(x) for x in args.streams.split(",")]
    # measured: WikiText-2 valid paragraphs 0.., which `sida predictor ahead` never fits on; calibration (the static
    # hot set's counts): C4 documents
    measured = beginnings(read_wikitext_paragraphs(DATA / "wikitext2" / "wiki.valid.tokens", max(streams)))
    calibration = beginnings(read_c4_texts(DATA / "c4_sample" / "c4_sample.jsonl", 16))
    methods = args.methods.split(",")
    reference, args.routes = eager_reference(args, measured, streams)
    rows = []
    for n in streams:
        if "resident" in methods:
            row, _ = run_cell(args, "resident", 1.0, n, measured, calibration, reference[n])
            rows.append(row)
            print(json.dumps(row), flush=True)
    for fraction in (float(x) for x in args.budgets.split(",")):
        for method in [m for m in methods if m != "resident"]:
            for n in streams:
                row, _ = run_cell(args, method, fraction, n, measured, calibration, reference.get(n))
                rows.append(row)
                print(json.dumps(row), flush=True)
    command = "bench/decode_offload.py " + " ".join(argv or sys.argv[1:])
    run = f"{args.name}-offload-{args.tier}-{args.budgets}-{date.today()}"
    header = {"run": run, "date": str(date.today()), "machine": platform.machine(), "command": command}
    merge(rows, header, args.out)


if __name__ == "__main__":
    main()
