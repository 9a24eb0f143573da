"""`sida serve` as a user runs it: a real process on a free port, the official openai client, concurrency, SIGTERM."""

import asyncio
import os
import signal

import httpx
import pytest

from tests.live_server import start_serve

pytestmark = pytest.mark.slow  # live `sida serve` processes

MODEL = "sida-switch-demo"


@pytest.fixture(scope="module")
def server(demo_dir):
    flags = [
        "--mode",
        "exact",
        "--budget-experts",
        "16",
        "--hash",
        "oracle",
        "--max-batch-wait-ms",
        "20",
        "--log-level",
        "warning",
    ]
    proc, base = start_serve(flags)
    yield proc, base
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


def test_openai_client_completions_and_stream(server):
    from openai import OpenAI

    _, base = server
    client = OpenAI(base_url=base + "/v1", api_key="unused")
    out = client.completions.create(model=MODEL, prompt="the city council voted", max_tokens=6, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.prompt_tokens > 0
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="the city council voted", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert client.models.list().data[0].id == MODEL


def test_200_concurrent_classify_requests_batch_together(server):
    _, base = server

    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            rs = await asyncio.gather(
                *(
                    c.post("/v1/classify", json={"model": MODEL, "input": f"movie number {i} was great ."})
                    for i in range(200)
                )
            )
        return rs

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    metrics = httpx.get(base + "/metrics").text
    count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("sida_batch_size_count")))
    total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("sida_batch_size_sum")))
    assert total >= 200 and total / count > 1  # requests really shared batches


def test_sigterm_finishes_accepted_requests(server):
    proc, base = server

    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            tasks = [
                asyncio.ensure_future(
                    c.post(
                        "/v1/completions",
                        json={"model": MODEL, "prompt": f"request {i}", "max_tokens": 16, "temperature": 0},
                    )
                )
                for i in range(20)
            ]
            await asyncio.sleep(0.3)
            os.kill(proc.pid, signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(run())
    assert proc.wait(60) == 0
    assert all(not isinstance(r, Exception) and r.status_code == 200 for r in results), results
