"""Throughput through HTTP (`sida serve`, one request per sentence, concurrent clients) against `sida eval`'s
batched loop on the same sentences, with the same mode and budget, measured in one run.

    .venv/bin/python bench/http_vs_eval.py --data ../shared/data/sst2/dev.tsv --mode exact --budget-experts 32

Prints one JSON object; `ratio` = HTTP sentences/s ÷ eval sentences/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from statistics import median

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def eval_loop(args, sentences: list[str]):
    """`sida eval`'s batched loop over the sentences, built and warmed up once: call it for sentences/s."""
    from sida.offload.tasks import get_task
    from sida.server.composition import build_runner
    from sida.server.settings import load_settings

    settings = load_settings(**_offload_flags(args), batch_size=args.batch_size)
    runner = build_runner(settings)
    task = get_task("sst2")
    prompts = [task.prompt(s) for s in sentences]
    runner.classify_prompts(prompts[: args.batch_size], task)  # warm-up, as the server does

    def run() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(prompts), args.batch_size):
            runner.classify_prompts(prompts[i : i + args.batch_size], task)
        return len(prompts) / (time.perf_counter() - t0)

    return run


def _offload_flags(args) -> dict:
    return {
        "mode": args.mode,
        "budget_experts": args.budget_experts,
        "policy": args.policy,
        "torch_threads": args.torch_threads,
    }


async def http_throughput(
    base: str, sentences: list[str], concurrency: int, per_request: int = 1, client: str = "raw"
) -> tuple[float, float]:
    """(sentences/s, client CPU seconds per request) over HTTP, `concurrency` calls in flight."""
    calls = [sentences[i : i + per_request] for i in range(0, len(sentences), per_request)]
    bodies = [json.dumps({"model": "sida-switch-demo", "input": c[0] if len(c) == 1 else c}).encode() for c in calls]
    post = _raw_posts if client == "raw" else _httpx_posts
    await post(base, bodies[:concurrency], concurrency)  # warm-up
    t0, cpu0 = time.perf_counter(), time.process_time()
    await post(base, bodies, concurrency)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return len(sentences) / wall, cpu / len(bodies)


async def _httpx_posts(base: str, bodies: list[bytes], concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:

        async def one(body: bytes):
            async with sem:
                r = await client.post("/v1/classify", content=body, headers=headers)
                r.raise_for_status()

        await asyncio.gather(*(one(b) for b in bodies))


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends a request and waits for its Content-Length response: a
    load generator costing the shared CPU a few tens of µs a call (httpx costs several hundred)."""

    def __init__(self):
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end]).lower()
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        if len(self.buffer) < end + 4 + length:
            return
        status, body = int(head[9:12]), bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        waiter, self.waiter = self.waiter, None
        waiter.set_result((status, body))

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


async def _raw_posts(base: str, bodies: list[bytes], concurrency: int) -> None:
    url = httpx.URL(base)
    loop = asyncio.get_running_loop()
    head = f"POST /v1/classify HTTP/1.1\r\nhost: {url.host}:{url.port}\r\ncontent-type: application/json\r\n"
    pending = iter(bodies)

    async def worker():
        _, conn = await loop.create_connection(_Connection, url.host, url.port)
        try:
            for body in pending:
                status, reply = await conn.post(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
                if status != 200 or b'"label"' not in reply:
                    raise RuntimeError(f"HTTP {status}: {reply[:200]!r}")
        finally:
            conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--mode", default="exact")
    p.add_argument("--budget-experts", type=int, default=32)
    p.add_argument("--policy", default="lru")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--torch-threads", type=int, default=2, help="torch threads of the `sida eval` loop")
    p.add_argument(
        "--server-torch-threads", type=int, help="torch threads of the server's inference worker (default: its own)"
    )
    p.add_argument(
        "--hash-torch-threads", type=int, help="torch threads of the server's batch worker (default: its own)"
    )
    p.add_argument("--rounds", type=int, default=3, help="eval and HTTP passes, alternated; medians are compared")
    p.add_argument("--per-request", type=int, default=1, help="sentences per HTTP call (`input` as a list)")
    p.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="load generator: raw asyncio HTTP/1.1 (keep-alive, tens of µs a call) or httpx (several hundred µs)",
    )
    args = p.parse_args()

    from sida.offload.tasks import get_task

    sentences = [e.prompt.removeprefix("sst2 sentence: ") for e in get_task("sst2").read(args.data)]
    eval_rate = eval_loop(args, sentences)

    from tests.live_server import start_serve

    flags = ["--log-level", "warning", "--mode", args.mode, "--budget-experts", str(args.budget_experts)]
    flags += ["--policy", args.policy, "--max-batch-size", str(args.batch_size), "--max-batch-wait-ms", "10"]
    flags += ["--torch-threads", str(args.server_torch_threads)] if args.server_torch_threads else []
    flags += ["--hash-torch-threads", str(args.hash_torch_threads)] if args.hash_torch_threads else []
    proc, base = start_serve(flags, timeout_s=240)
    evals, https, cpus = [], [], []
    try:  # alternated in one run: this shared box's speed drifts by tens of percent over minutes
        for _ in range(args.rounds):
            evals.append(eval_rate())
            rate, cpu = asyncio.run(http_throughput(base, sentences, args.concurrency, args.per_request, args.client))
            https.append(rate)
            cpus.append(cpu)
        metrics = httpx.get(base + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(60)
    size_sum = float(next(x.split()[-1] for x in metrics.splitlines() if x.startswith("sida_batch_size_sum")))
    size_count = float(next(x.split()[-1] for x in metrics.splitlines() if x.startswith("sida_batch_size_count")))
    print(
        json.dumps(
            {
                "sentences": len(sentences),
                "mode": args.mode,
                "budget_experts": args.budget_experts,
                "eval_sentences_per_s": round(median(evals), 1),
                "http_sentences_per_s": round(median(https), 1),
                "ratio": round(median(https) / median(evals), 3),
                "rounds": {"eval": [round(x, 1) for x in evals], "http": [round(x, 1) for x in https]},
                "http_mean_batch_size": round(size_sum / size_count, 2),
                "concurrency": args.concurrency,
                "sentences_per_request": args.per_request,
                "client": args.client,
                "client_cpu_us_per_request": round(median(cpus) * 1e6),
                "torch_threads": {
                    "eval": args.torch_threads,
                    "server": args.server_torch_threads,
                    "hash": args.hash_torch_threads,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
