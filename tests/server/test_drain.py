"""A real `sida serve` on the demo model: a few seconds of the soak's mixed traffic (no failed call), then
SIGTERM in the middle of a burst: readiness answers 503 at once, new calls 503, every accepted call is answered
in full, and the process exits 0 within the drain timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import httpx
import pytest

from tests.conftest import REPO
from tests.live_server import metric_value, start_serve

sys.path.insert(0, str(REPO / "bench"))

import soak  # noqa: E402

pytestmark = pytest.mark.slow  # live `sida serve` processes

MODEL = "sida-switch-demo"
REQUEST_TIMEOUT_S = 20  # the drain timeout is this and a margin (Settings.drain_timeout_s)


@pytest.fixture(scope="module")
def server(demo_dir):
    flags = ["--max-batch-size", "4", "--request-timeout-s", str(REQUEST_TIMEOUT_S), "--log-level", "warning"]
    proc, base = start_serve(flags)
    yield proc, base
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def test_mixed_traffic_for_a_few_seconds_fails_no_call(server):
    proc, base = server
    report = asyncio.run(soak.soak(base, proc.pid, duration_s=3, concurrency=4, every_s=0.5))
    assert report["errors"] == 0, report["error_examples"]
    assert all(n > 0 for n in report["served"].values()), report["served"]
    assert report["rss_bytes"]["start"] > 0


def accepted_since(base: str, started_before: float) -> float:
    """Calls accepted since the count `started_before`: those started since, and those queued."""
    text = httpx.get(base + "/metrics").text  # one scrape: started is read before the queue depth
    return metric_value(text, "sida_queue_wait_seconds_count") - started_before + metric_value(text, "sida_queue_depth")


async def call(client: httpx.AsyncClient, i: int) -> str:
    """One call of the burst: a classify, a completion or a streamed completion; its outcome as text."""
    if i % 3 == 0:
        r = await client.post("/v1/classify", json={"model": MODEL, "input": f"movie number {i} was fine ."})
        return "ok" if r.status_code == 200 and r.json()["data"][0]["label"] else f"{r.status_code} {r.text}"
    body = {"model": MODEL, "prompt": f"request {i} says", "max_tokens": 32, "temperature": 0}
    if i % 3 == 1:
        r = await client.post("/v1/completions", json=body)
        return "ok" if r.status_code == 200 and r.json()["usage"]["completion_tokens"] else f"{r.status_code} {r.text}"
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    ok = r.status_code == 200 and events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
    return "ok" if ok else f"{r.status_code} {events[-2:]}"


def test_sigterm_during_a_burst_drains_and_exits_0(server):
    proc, base = server
    n = 48
    started_before = metric_value(httpx.get(base + "/metrics").text, "sida_queue_wait_seconds_count")

    async def run() -> tuple[list, int, list, float]:
        limits = httpx.Limits(max_connections=n + 8)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            burst = [asyncio.ensure_future(call(client, i)) for i in range(n)]
            t0 = time.monotonic()
            while await asyncio.to_thread(accepted_since, base, started_before) < n:
                assert time.monotonic() - t0 < 30, "the burst was not accepted"
                await asyncio.sleep(0.05)
            unanswered = sum(not t.done() for t in burst)
            os.kill(proc.pid, signal.SIGTERM)
            t_signal = time.monotonic()
            probes = []
            while time.monotonic() - t_signal < 1:
                probes.append((await client.get("/health/ready")).status_code)
                if probes[-1] == 503:
                    break
            refused = await client.post("/v1/classify", json={"model": MODEL, "input": "too late ."})
            probes.append(refused.status_code)
            return await asyncio.gather(*burst), unanswered, probes, t_signal

    outcomes, unanswered, probes, t_signal = asyncio.run(run())
    assert probes[-2:] == [503, 503], probes  # readiness, then a new call, while the burst is still served
    assert unanswered > 0  # the signal came in the middle of the burst
    assert outcomes == ["ok"] * n, [o for o in outcomes if o != "ok"]
    assert proc.wait(REQUEST_TIMEOUT_S + 5) == 0
    assert time.monotonic() - t_signal < REQUEST_TIMEOUT_S + 5
