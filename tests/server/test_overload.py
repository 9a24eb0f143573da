"""The real app on a real socket (uvicorn in this process) under more load than it takes: a burst far over
`max_queue` gets only 200s and 429s, `/info` and `/metrics` answer throughout, an expired request gets 504 and
frees its place."""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from sida.server.app import app_from_settings
from sida.server.settings import load_settings
from tests.live_server import free_port

MODEL = "sida-switch-demo"
SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "a dull , lifeless , boring mess .",
    "the best film of the year .",
    "an ugly , tedious waste of time .",
    "it 's a charming and often affecting journey .",
    "the plot is nothing but boilerplate clichés .",
]


def demo_app(**overrides) -> FastAPI:
    """The app `sida serve` builds on the demo model (`app_from_settings`), with settings of choice."""
    return app_from_settings(
        load_settings(**{"mode": "exact", "budget_experts": 8, "max_batch_wait_ms": 5, "torch_threads": 1, **overrides})
    )


@contextmanager
def running(app: FastAPI, **config) -> Iterator[str]:
    """`app` served by uvicorn (with `config`: more `uvicorn.Config` keywords) on a free local port in a thread of
    this process; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def classify(c: httpx.Client, text: str) -> str:
    r = c.post("/v1/classify", json={"model": MODEL, "input": text})
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["label"]


@pytest.fixture(scope="module")
def bounded(demo_dir):
    """The demo app with room for 4 queued requests; its state, for spying on the queue-depth gauge."""
    app = demo_app(max_queue=4)
    with running(app) as base:
        yield base, app.state.sida


def test_a_burst_over_the_queue_bound_gets_200s_and_429s_while_info_and_metrics_answer(bounded):
    base, state = bounded
    with httpx.Client(base_url=base, timeout=60) as c:
        quiet = {text: classify(c, text) for text in SENTENCES}
    depths: list[float] = []
    gauge = state.metrics.queue_depth
    record = gauge.set
    gauge.set = lambda v: (depths.append(v), record(v))  # every value the pipeline reports

    async def burst() -> tuple[list[httpx.Response], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:
            done = asyncio.Event()

            async def scrape() -> list[httpx.Response]:
                seen = []
                while not done.is_set():
                    seen += [await c.get("/info"), await c.get("/metrics")]
                return seen

            scraper = asyncio.ensure_future(scrape())
            texts = [SENTENCES[i % len(SENTENCES)] for i in range(150)]
            answers = await asyncio.gather(*(c.post("/v1/classify", json={"model": MODEL, "input": t}) for t in texts))
            done.set()
            return list(answers), await scraper

    try:
        answers, scrapes = asyncio.run(burst())
    finally:
        del gauge.set
    statuses = [r.status_code for r in answers]
    assert set(statuses) == {200, 429}, sorted(set(statuses))
    for text, r in zip((SENTENCES[i % len(SENTENCES)] for i in range(150)), answers):
        if r.status_code == 200:
            assert r.json()["data"][0]["label"] == quiet[text]  # batched under load as when quiet
        else:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"] == {
                "message": "the request queue is full; retry shortly",
                "type": "rate_limit_error",
                "param": None,
                "code": "queue_full",
            }
    assert scrapes and all(r.status_code == 200 for r in scrapes)
    scraped = [
        float(line.split()[-1]) for r in scrapes for line in r.text.splitlines() if line.startswith("sida_queue_depth ")
    ]
    assert depths and max(depths) <= 4 and max(scraped, default=0) <= 4
    assert state.pipeline.queue_depth == 0


def test_info_and_metrics_while_counters_gain_keys(bounded):
    """`/info` and `/metrics` read the engine's per-layer counters while the inference thread adds keys to them
    (the first batches after a reset do): a thread here adds keys the whole time, with the interpreter switching
    threads as often as it can, so that a read iterating a counter being added to fails here if nowhere else."""
    base, state = bounded
    stats = state.runner.engine.routing_stats
    stop = threading.Event()

    def add_keys() -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            stats.hash_lookups[1000 + i % 2000] += 1
            stats.hash_hits[(1000 + i % 2000, 1)] += 1
            if i % 2000 == 1999:
                stats.clear()

    interval = sys.getswitchinterval()
    writer = threading.Thread(target=add_keys, daemon=True)
    sys.setswitchinterval(1e-6)
    writer.start()
    try:
        with httpx.Client(base_url=base, timeout=10) as c:
            assert c.get("/info").json()["hash"] == "predictor"  # the demo model's shipped predictor builds tables
            for _ in range(200):
                assert c.get("/info").status_code == 200
                assert c.get("/metrics").status_code == 200
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(interval)
        stats.clear()


def test_a_failing_batch_is_500_in_the_envelope_and_the_next_call_is_served(bounded):
    base, state = bounded
    runner = state.runner
    run = runner.classify_ids

    def fail_once(*args, **kwargs):
        runner.classify_ids = run
        raise RuntimeError("the model broke")

    runner.classify_ids = fail_once
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post("/v1/classify", json={"model": MODEL, "input": SENTENCES[0]})
        assert r.status_code == 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["type"] == "server_error"
        with httpx.Client(base_url=base, timeout=30) as c:
            assert classify(c, SENTENCES[0])
    finally:
        runner.classify_ids = run


@pytest.fixture
def short_deadline(demo_dir):
    """The demo app with 1 s to answer; `hold` blocks its inference worker until set."""
    app = demo_app(request_timeout_s=1.0, max_queue=4)
    hold = threading.Event()
    with running(app) as base:
        runner = app.state.sida.runner
        run = runner.classify_ids

        def held(*args, **kwargs):
            hold.wait(10)
            return run(*args, **kwargs)

        runner.classify_ids = held
        try:
            yield base, app.state.sida, hold
        finally:
            hold.set()


def test_an_expired_request_gets_504_and_frees_its_place(short_deadline):
    """While the inference worker is held, A runs, B waits hashed, C and D wait in the batcher with deadlines
    0.65 s apart; once released after C's deadline, A, B and C get 504, D (the rest of C's batch) 200, and the
    queue is empty again."""
    base, state, hold = short_deadline

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:

            async def post(delay: float, text: str) -> httpx.Response:
                await asyncio.sleep(delay)
                return await client.post("/v1/classify", json={"model": MODEL, "input": text})

            async def release() -> None:
                await asyncio.sleep(1.3)  # A, B, C are past their deadline, D is not
                hold.set()

            a, b, c, d = (post(t, text) for t, text in zip((0.0, 0.05, 0.15, 0.8), SENTENCES))
            return await asyncio.gather(a, b, c, d, release())

    a, b, c, d, _ = asyncio.run(run())
    for r in (a, b, c):
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert d.status_code == 200, d.text
    deadline = time.monotonic() + 5
    while state.pipeline.queue_depth and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.pipeline.queue_depth == 0  # every place is free again
    with httpx.Client(base_url=base, timeout=30) as client:
        assert [classify(client, t) for t in SENTENCES[:4]]  # a full queue's worth is taken
