"""What Ray Serve's proxy costs: HTTP classify throughput of `sida serve` (one process) against
`sida serve --replicas 1` (the same app as one Ray Serve replica behind Ray's proxy), same model and settings,
measured in one run.

    .venv/bin/python bench/ray_overhead.py --data ../shared/data/sst2/dev.tsv

Prints one JSON object; `ratio` = Ray sentences/s ÷ direct sentences/s (median of `--passes`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from statistics import median

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.live_server import start_serve  # noqa: E402


async def throughput(base: str, sentences: list[str], concurrency: int) -> float:
    """Sentences/s, one call per sentence, `concurrency` calls in flight; every call must answer 200."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:

        async def one(text: str) -> None:
            async with gate:
                r = await c.post("/v1/classify", json={"model": "sida-switch-demo", "input": text})
                r.raise_for_status()

        await asyncio.gather(*(one(s) for s in sentences[:concurrency]))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(one(s) for s in sentences))
        return len(sentences) / (time.perf_counter() - t0)


def measure(flags: list[str], sentences: list[str], concurrency: int, passes: int) -> list[float]:
    proc, base = start_serve(flags, timeout_s=180)
    try:
        return [round(asyncio.run(throughput(base, sentences, concurrency)), 1) for _ in range(passes)]
    finally:
        proc.send_signal(signal.SIGTERM)  # both forms drain on SIGTERM and exit
        proc.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads of the one server / the one replica")
    args = ap.parse_args()
    lines = Path(args.data).read_text().splitlines()[1:]  # sentence<TAB>label, after a header
    sentences = [line.split("\t")[0] for line in lines][: args.limit]
    common = ["--torch-threads", str(args.torch_threads), "--log-level", "warning"]
    direct = measure(common, sentences, args.concurrency, args.passes)
    ray = measure([*common, "--replicas", "1"], sentences, args.concurrency, args.passes)
    out = {
        "sentences": len(sentences),
        "concurrency": args.concurrency,
        "torch_threads": args.torch_threads,
        "direct_sentences_per_s": direct,
        "ray_1_replica_sentences_per_s": ray,
        "ratio": round(median(ray) / median(direct), 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
