"""Chaos: the disk tier's expert reads fail at a set rate and stall at random (a seeded wrapper around the expert
file's read), and one byte of the expert file is flipped, while mixed traffic (classify, completions, streamed
completions; greedy and seeded sampling) runs against a real server on loopback.

    .venv/bin/python bench/chaos.py --fail-rate 0.01          # `make chaos` runs 1% and 10%
    .venv/bin/python bench/chaos.py --fail-rate 0.1 --calls 40 --rounds 1

The same calls go first to a resident server (the reference), then, `--rounds` times, to an offloaded one (tier
disk, `--budget` of the experts). Every call to the offloaded server must get the reference's answer or a 5xx
error envelope (plain or in-stream); none may go unanswered past its deadline; afterwards no expert stays pinned,
the device bytes placed are what they were, the process's RSS grows by at most `--max-growth-mb` from the first
round to the last, and `/metrics` counts every injected fault (`sida_expert_load_failures_total`) and the repair
of the flipped expert (`sida_expert_repairs_total`). Prints one JSON object (also merged into
`bench/results/cpu-chaos.json` with `--out`); exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import httpx
import uvicorn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.soak import rss_bytes  # noqa: E402
from loadtest.inputs import read_inputs  # noqa: E402
from sida.offload.checkpoint import read_header  # noqa: E402
from sida.server.app import app_from_settings  # noqa: E402
from sida.server.composition import build_runner  # noqa: E402
from sida.server.settings import Settings  # noqa: E402
from tests.live_server import free_port, metric_value, ready  # noqa: E402

DATA = REPO.parent / "shared" / "data"
KINDS = ("classify", "complete", "stream")
SERVER_ERRORS = {"server_error", "service_unavailable", "timeout_error"}  # the envelope types of 5xx answers


@dataclass
class FaultyReads:
    """A seeded wrapper around a read `(key, buf) -> None`: a stall of up to `stall_s` at `stall_rate`, then an
    OSError(EIO) at `fail_rate`; counts what it injected."""

    inner: object
    fail_rate: float
    stall_rate: float
    stall_s: float
    seed: int
    failures: int = 0
    stalls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self._rng = random.Random(self.seed)

    def __call__(self, key, buf) -> None:
        with self._lock:
            stall = self._rng.random() < self.stall_rate
            pause = self._rng.uniform(0, self.stall_s)
            fail = self._rng.random() < self.fail_rate
            self.stalls += stall
            self.failures += fail
        if stall:
            time.sleep(pause)
        if fail:
            raise OSError(errno.EIO, f"injected read failure of expert {key}")
        self.inner(key, buf)


def plan_calls(model: str, data: Path, n: int, seed: int, max_tokens: int) -> list[tuple[str, dict]]:
    """`n` calls of the three kinds: 1–4 SST-2 sentences to classify, WikiText beginnings to complete (greedy, or
    sampled with a seed), plain or streamed."""
    rng, inputs = random.Random(seed), read_inputs(data)
    calls = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if kind == "classify":
            sentences = rng.sample(inputs.sentences, rng.randint(1, 4))
            calls.append((kind, {"model": model, "task": "sst2", "input": sentences}))
            continue
        body = {"model": model, "prompt": rng.choice(inputs.prompts), "max_tokens": max_tokens, "temperature": 0.0}
        if rng.random() < 0.3:
            body.update(temperature=0.8, seed=rng.randrange(2**31))
        calls.append((kind, {**body, "stream": kind == "stream"}))
    return calls


async def one_call(client: httpx.AsyncClient, kind: str, body: dict) -> tuple[str, object]:
    """("ok", the answer) or ("5xx", the envelope's type) or ("other", what came back)."""
    path = "/v1/classify" if kind == "classify" else "/v1/completions"
    if kind != "stream":
        r = await client.post(path, json=body)
        if r.status_code >= 500:
            return ("5xx" if r.json()["error"]["type"] in SERVER_ERRORS else "other", r.text[:200])
        if r.status_code != 200:
            return "other", f"{r.status_code} {r.text[:200]}"
        out = r.json()
        if kind == "classify":
            return "ok", [d["label"] for d in out["data"]]
        return "ok", (out["choices"][0]["text"], out["choices"][0]["finish_reason"])
    text, finish = "", None
    async with client.stream("POST", path, json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                kind_ = "5xx" if event["error"]["type"] in SERVER_ERRORS else "other"
                return kind_, line[:200]
            choice = event["choices"][0]
            text, finish = text + choice["text"], choice.get("finish_reason") or finish
    if r.status_code != 200:
        return "other", f"{r.status_code}"
    return "ok", (text, finish)


async def traffic(base: str, calls: list, concurrency: int, timeout_s: float) -> list[tuple[str, object]]:
    """Every call, `concurrency` at a time; a call not answered within `timeout_s` is ("hung", ...)."""
    gate = asyncio.Semaphore(concurrency)
    # a new connection per call: a kept-alive one that uvicorn closes while the pool hands it out is a client race
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits) as client:

        async def run(kind: str, body: dict):
            async with gate:
                try:
                    return await asyncio.wait_for(one_call(client, kind, body), timeout_s)
                except (TimeoutError, httpx.TimeoutException) as e:
                    return "hung", f"{type(e).__name__}"
                except httpx.HTTPError as e:
                    return "other", f"{type(e).__name__}: {e}"

        return await asyncio.gather(*(run(k, b) for k, b in calls))


class LiveServer:
    """The app of `settings` served by uvicorn on a thread of this process, on a free loopback port."""

    def __init__(self, settings: Settings):
        self.app = app_from_settings(settings)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 300
        while not ready(self.base):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(120)

    @property
    def engine(self):
        return self.app.state.sida.runner.engine

    def metric(self, series: str) -> float:
        """A series of the server's /metrics now (NaN if absent: a count the server lacks fails every check)."""
        return metric_value(httpx.get(self.base + "/metrics").text, series, default=float("nan"))


def flip_one_byte(expert_dir: Path, seed: int) -> str:
    """Flip one byte inside one expert's values in the expert file (written by an engine built once before);
    returns the expert's tensor name."""
    (path,) = expert_dir.glob("*.safetensors")
    tensors, _ = read_header(path)
    name = random.Random(seed).choice(sorted(tensors))
    offset = tensors[name].offset + tensors[name].nbytes // 2
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    return name


def wrap_reads(engine, args) -> FaultyReads:
    """Put the faulty wrapper around the disk store's file read (the checksum check and the repair run above it)."""
    file = engine.cache.store.file
    file.read_into = FaultyReads(file.read_into, args.fail_rate, args.stall_rate, args.stall_s, args.seed)
    return file.read_into


def settings_for(args, **over) -> Settings:
    base = dict(
        model_dir=args.model, device="cpu", request_timeout_s=args.request_timeout_s, max_queue=4 * args.calls,
        log_level="warning",
    )  # fmt: skip
    return Settings(**{**base, **over})


def judge(calls: list, reference: list, answers: list) -> dict:
    """Counts of the offloaded answers: right (the reference's), 5xx envelopes, hung, and anything else."""
    counts = {"right": 0, "wrong": 0, "server_errors": 0, "hung": 0, "other": 0}
    examples = []
    for (kind, body), (ref_kind, ref), (got_kind, got) in zip(calls, reference, answers):
        if ref_kind != "ok":
            raise RuntimeError(f"the reference server failed a {kind} call: {ref}")
        if got_kind == "ok":
            key = "right" if got == ref else "wrong"
        else:
            key = {"5xx": "server_errors", "hung": "hung"}.get(got_kind, "other")
        counts[key] += 1
        if key in ("wrong", "other", "hung") and len(examples) < 5:
            examples.append({"kind": kind, "body": body, "expected": ref, "got": [got_kind, got]})
    return {**counts, "examples": examples}


def run(args) -> dict:
    calls = plan_calls(args.model.name, args.data, args.calls, args.seed, args.max_tokens)
    with LiveServer(settings_for(args, mode="resident")) as ref:
        reference = asyncio.run(traffic(ref.base, calls, args.concurrency, args.request_timeout_s + 30))
    with tempfile.TemporaryDirectory(prefix="sida-chaos-") as tmp:
        disk = settings_for(args, tier="disk", expert_dir=Path(tmp), budget_experts=args.budget_experts)
        build_runner(disk).engine.close()  # writes the expert file
        flipped = flip_one_byte(Path(tmp), args.seed)
        with LiveServer(disk) as srv:
            row = {"flipped": flipped, **storm(args, srv, calls, reference)}
    row["checks"] = checks(row, args)
    row["passed"] = all(row["checks"].values())
    return row


def storm(args, srv: LiveServer, calls: list, reference: list) -> dict:
    """The calls, `args.rounds` times, against the offloaded server with faulty reads; the row's figures."""
    engine = srv.engine
    placed = engine.memory.total
    faults = wrap_reads(engine, args)
    judged, rss = [], []
    for _ in range(args.rounds):
        answers = asyncio.run(traffic(srv.base, calls, args.concurrency, args.request_timeout_s + 30))
        judged.append(judge(calls, reference, answers))
        rss.append(rss_bytes(os.getpid()))
    time.sleep(0.5)  # the last batch's release
    return {
        "fail_rate": args.fail_rate, "stall_rate": args.stall_rate, "stall_s": args.stall_s,
        "calls": args.calls * args.rounds, "concurrency": args.concurrency,
        "budget_experts": engine.num_slots, "total_experts": engine.total_experts,
        **{k: sum(j[k] for j in judged) for k in ("right", "wrong", "server_errors", "hung", "other")},
        "injected_failures": faults.failures, "injected_stalls": faults.stalls,
        "counted_failures": srv.metric("sida_expert_load_failures_total"),
        "load_retries": srv.metric("sida_expert_load_retries_total"),
        "repairs": srv.metric("sida_expert_repairs_total"), "stuck_steps": srv.metric("sida_stuck_steps_total"),
        "pinned_after": len(engine.cache.pinned_keys), "device_bytes_placed": [placed, engine.memory.total],
        "rss_growth_mb": round((rss[-1] - rss[0]) / 2**20, 1) if len(rss) > 1 else None,
        "ready_after": ready(srv.base), "examples": [e for j in judged for e in j["examples"]][:5],
    }  # fmt: skip


def checks(row: dict, args) -> dict:
    return {
        "no_wrong_answer": row["wrong"] == 0 and row["other"] == 0,
        "none_hung": row["hung"] == 0,
        "none_pinned": row["pinned_after"] == 0,
        "device_bytes_unchanged": row["device_bytes_placed"][0] == row["device_bytes_placed"][1],
        "memory_levels_off": row["rss_growth_mb"] is None or row["rss_growth_mb"] <= args.max_growth_mb,
        "every_failure_counted": row["counted_failures"] == row["injected_failures"],
        "flip_repaired": row["repairs"] == 1,
        "ready_after": row["ready_after"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "models" / "sida-switch-demo")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--fail-rate", type=float, default=0.01)
    p.add_argument("--stall-rate", type=float, default=0.05)
    p.add_argument("--stall-s", type=float, default=0.2)
    p.add_argument("--calls", type=int, default=120, help="calls per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--budget-experts", type=int, default=24)
    p.add_argument("--request-timeout-s", type=float, default=30.0)
    p.add_argument("--max-growth-mb", type=float, default=64.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="merge the row into this JSON file (bench/results/cpu-chaos.json)")
    args = p.parse_args(argv)
    row = run(args)
    print(json.dumps(row), flush=True)
    if args.out is not None:
        save(row, args)
    return 0 if row["passed"] else 1


def save(row: dict, args) -> None:
    """Merge `row` into `args.out`, replacing the row of the same fail rate."""
    rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    rows = [r for r in rows if r["fail_rate"] != row["fail_rate"]] + [row]
    header = {
        "date": str(date.today()),
        "machine": platform.machine(),
        "command": "bench/chaos.py " + " ".join(sys.argv[1:]),
    }
    args.out.write_text(json.dumps({"rows": sorted(rows, key=lambda r: r["fail_rate"]), **header}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
