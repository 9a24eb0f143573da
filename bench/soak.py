"""Soak: mixed classify / completion / streaming traffic against a real `sida serve` on loopback for a fixed time.
Every call must succeed, and the server's resident memory must level off: the peak RSS of the second half of the
run (after a warm-up) may not exceed that of the first half by more than `--max-growth-mb`. On CUDA the device
memory the server reports (`sida_device_memory_bytes{kind="allocated"}`) is held to the same test.

    .venv/bin/python bench/soak.py --duration 120            # `make soak`, SOAK_S=30 for a short one

Prints one JSON object; exits 1 if a call failed or memory kept growing, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.live_server import start_serve  # noqa: E402

MODEL = "sida-switch-demo"
SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish .",
    "it 's a charming and often affecting journey .",
    "a dull , lifeless , boring mess .",
]
PROMPTS = ["the city council voted on tuesday to", "this recipe is easy to make and", "the team said on monday"]
KINDS = ("classify", "complete", "stream")


@dataclass
class Tally:
    """Calls served and failed, by kind; the first few failures as text."""

    served: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    failed: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    examples: list = field(default_factory=list)

    def fail(self, kind: str, what: str) -> None:
        self.failed[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: {what}")


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def device_allocated(metrics_text: str) -> int | None:
    """The server's `sida_device_memory_bytes{kind="allocated"}` (CUDA only), or None."""
    for line in metrics_text.splitlines():
        if line.startswith('sida_device_memory_bytes{kind="allocated"}'):
            return int(float(line.split()[-1]))
    return None


async def one_call(client: httpx.AsyncClient, kind: str, rng: random.Random) -> str | None:
    """One call of `kind` with varied inputs and sampling; what went wrong (a non-200 answer, a broken stream),
    or None."""
    if kind == "classify":
        body = {"model": MODEL, "input": rng.sample(SENTENCES, rng.randint(1, 3))}
        r = await client.post("/v1/classify", json=body)
        ok = r.status_code == 200 and len(r.json()["data"]) == len(body["input"])
        return None if ok else f"{r.status_code} {r.text[:200]}"
    body = {
        "model": MODEL,
        "prompt": rng.choice(PROMPTS),
        "max_tokens": rng.choice((4, 8, 16)),
        "temperature": rng.choice((0, 0.8)),
        "seed": rng.randint(0, 3),
    }
    if kind == "complete":
        r = await client.post("/v1/completions", json=body)
        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return None if ok else f"{r.status_code} {r.text[:200]}"
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    ok = r.status_code == 200 and events[-1:] == ["data: [DONE]"] and not any('"error"' in e for e in events)
    return None if ok else f"{r.status_code} {events[-2:]}"


async def traffic(base: str, until: float, concurrency: int, tally: Tally, seed: int = 0) -> None:
    """`concurrency` clients, each cycling through the kinds, until the monotonic time `until`."""

    async def client_loop(i: int) -> None:
        rng = random.Random(seed + i)
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            for kind in itertools.cycle(KINDS[i % 3 :] + KINDS[: i % 3]):
                if time.monotonic() >= until:
                    return
                try:
                    wrong = await one_call(client, kind, rng)
                except httpx.HTTPError as e:
                    wrong = f"{type(e).__name__}: {e}"
                if wrong is None:
                    tally.served[kind] += 1
                else:
                    tally.fail(kind, wrong)

    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))


async def sample_memory(base: str, pid: int, until: float, every_s: float) -> tuple[list, list]:
    """[(t, rss bytes)] of the server and [(t, device bytes allocated)] (empty off CUDA), every `every_s`."""
    rss, device = [], []
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        while time.monotonic() < until:
            t = time.monotonic() - t0
            rss.append((t, rss_bytes(pid)))
            allocated = device_allocated((await client.get("/metrics")).text)
            if allocated is not None:
                device.append((t, allocated))
            await asyncio.sleep(every_s)
    return rss, device


def growth(samples: list, warmup_s: float) -> dict | None:
    """Peak of the first and the second half of the samples after `warmup_s`, and the second minus the first."""
    kept = [v for t, v in samples if t >= warmup_s]
    if len(kept) < 4:
        return None
    half = len(kept) // 2
    first, second = max(kept[:half]), max(kept[half:])
    return {"start": kept[0], "first_half_peak": first, "second_half_peak": second, "growth": second - first}


async def soak(base: str, pid: int, duration_s: float, concurrency: int = 8, every_s: float = 1.0) -> dict:
    """Run the traffic for `duration_s` while sampling memory; the report (no verdict)."""
    tally = Tally()
    until = time.monotonic() + duration_s
    t0 = time.perf_counter()
    _, (rss, device) = await asyncio.gather(
        traffic(base, until, concurrency, tally), sample_memory(base, pid, until, every_s)
    )
    seconds = time.perf_counter() - t0
    warmup_s = duration_s * 0.2
    return {
        "seconds": round(seconds, 1),
        "served": tally.served,
        "requests": sum(tally.served.values()),
        "requests_per_s": round(sum(tally.served.values()) / seconds, 1),
        "errors": sum(tally.failed.values()),
        "failed": tally.failed,
        "error_examples": tally.examples,
        "warmup_s": warmup_s,
        "rss_bytes": growth(rss, warmup_s),
        "device_allocated_bytes": growth(device, warmup_s),
    }


def problems(report: dict, max_growth_bytes: int) -> list[str]:
    """Why the soak failed (empty when it passed)."""
    found = []
    if report["errors"]:
        found.append(f"{report['errors']} calls failed, e.g. {report['error_examples'][:2]}")
    if report["requests"] == 0:
        found.append("no call was served")
    for key in ("rss_bytes", "device_allocated_bytes"):
        g = report[key]
        if g is not None and g["growth"] > max_growth_bytes:
            found.append(f"{key} kept growing: +{g['growth'] / 2**20:.1f} MiB from the first half to the second")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    p.add_argument("--concurrency", type=int, default=8, help="clients with one call in flight each")
    p.add_argument("--max-growth-mb", type=float, default=16.0, help="allowed peak growth, second half over first")
    p.add_argument("--model", default=str(REPO / "models" / MODEL))
    p.add_argument("serve_flags", nargs="*", help="more `sida serve` flags (after --)")
    args = p.parse_args(argv)
    proc, base = start_serve(["--model", args.model, "--log-level", "warning", *args.serve_flags])
    try:
        report = asyncio.run(soak(base, proc.pid, args.duration, args.concurrency))
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        exit_status = proc.wait(120)
    report["server_exit_status"] = exit_status
    found = problems(report, int(args.max_growth_mb * 2**20))
    if exit_status != 0:
        found.append(f"the server exited with {exit_status} after SIGTERM")
    report["problems"] = found
    print(json.dumps(report))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
