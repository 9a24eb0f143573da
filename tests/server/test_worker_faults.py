"""Faults in the workers: an exception anywhere in a batch's handling fails that batch only (counted by stage,
logged with its traceback) and the worker goes on; a worker thread that dies anyway fails every pending request
at once with a 503, turns readiness to 503 and ends `sida serve` with a non-zero status, never a hang."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from sida.offload.hash_table import HashTable
from sida.offload.tasks import get_task
from sida.server import cli
from sida.server.app import build_app
from sida.server.batcher import Batcher
from sida.server.metrics import Metrics
from sida.server.pipeline import Pipeline
from sida.server.request import PipelineFailed, Request
from sida.server.state import ServeOptions
from sida.server.workers import BatchWorker, HashedBatch, InferenceWorker
from tests.live_server import free_port
from tests.server.fakes import FakeRunner

TASK = get_task("sst2")
MODEL = "fake-moe"


class Crash(BaseException):
    """What no `except Exception` catches: a worker thread that raises it dies."""


class FaultyRunner(FakeRunner):
    """The fake runner, whose methods raise `faults[name]` (an exception instance) once each, then work: rows are
    labelled by their first token's parity. `gate` (if set) holds classify_ids until it is set."""

    def __init__(self, **faults: BaseException):
        self.faults = faults
        self.gate: threading.Event | None = None
        self.calls = 0

    def _maybe_raise(self, name: str) -> None:
        fault = self.faults.pop(name, None)
        if fault is not None:
            raise fault

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[len(t) % 5 + 1, 7, 7] for t in texts]

    def pad(self, ids):
        self._maybe_raise("pad")
        return super().pad(ids)

    def build_hash_table(self, enc, decoder_input_ids=None):
        self._maybe_raise("build_hash_table")
        return super().build_hash_table(enc, decoder_input_ids)

    def classify_ids(self, enc, task, hash_table=None, shadow=False):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        self._maybe_raise("classify_ids")
        return super().classify_ids(enc, task, hash_table, shadow)


def request(loop, first: int, deadline: float = 100.0) -> Request:
    key, params = ("classify", "sst2"), {"task": TASK}
    return Request("classify", [first, 7, 7], key, params, deadline, loop, loop.create_future(), arrival=0.0)


def outcome(loop, req: Request):
    loop.run_until_complete(asyncio.sleep(0))
    if not req.future.done():
        return None
    error = req.future.exception()
    return type(error).__name__ if error is not None else req.future.result().label


def errors(metrics: Metrics, stage: str) -> float:
    return metrics.batch_errors[stage]._value.get()


# ---------------------------------------------------------------------------------------------- one batch fails


@pytest.mark.parametrize("fault", ["pad", "build_hash_table"])
def test_a_batch_worker_fault_fails_its_batch_only_and_the_worker_goes_on(loop, caplog, fault):
    runner, metrics, left = FaultyRunner(**{fault: ValueError(f"{fault} broke")}), Metrics(), []
    worker = BatchWorker(runner, Batcher(2, 10_000, 0.0), metrics, left.append)
    bad, good = [request(loop, 2), request(loop, 4)], [request(loop, 3)]
    with caplog.at_level(logging.ERROR, logger="sida"):
        batches = worker.step(bad, now=0.0)
    assert batches == [] and [outcome(loop, r) for r in bad] == ["ValueError", "ValueError"]
    assert left == bad  # they left the queue, so its depth stays right
    assert errors(metrics, "predict") == 1 and errors(metrics, "infer") == 0
    assert "Traceback" in caplog.text and f"{fault} broke" in caplog.text
    (batch,) = worker.step(good, now=0.0)
    assert batch.requests == good and batch.table is not None


def test_an_inference_fault_outside_the_model_call_fails_its_batch_only(loop, caplog):
    """A batch whose padding lacks its mask fails in the worker's own bookkeeping, before the model runs."""
    runner, metrics, left = FaultyRunner(), Metrics(), []
    worker = InferenceWorker(runner, metrics, left.append)
    broken = [request(loop, 2), request(loop, 3)]
    enc = runner.pad([r.ids for r in broken])
    del enc["attention_mask"]
    with caplog.at_level(logging.ERROR, logger="sida"):
        worker.step(HashedBatch(broken, enc, None, 0.0), now=0.0)
    good = [request(loop, 5)]
    worker.step(HashedBatch(good, runner.pad([good[0].ids]), None, 0.0), now=0.0)
    assert [outcome(loop, r) for r in broken] == ["KeyError", "KeyError"] and outcome(loop, good[0]) == "positive"
    assert errors(metrics, "infer") == 1 and len(left) == 3
    assert "infer: a batch of 2 requests failed" in caplog.text and "Traceback" in caplog.text


def test_an_inference_fault_after_dropping_expired_rows_keeps_their_504(loop):
    """The table cannot drop the expired row: the live request fails, the expired one keeps DeadlineExceeded."""
    runner, metrics = FaultyRunner(), Metrics()
    worker = InferenceWorker(runner, metrics, lambda r: None)
    reqs = [request(loop, 2, deadline=1.0), request(loop, 3, deadline=9.0)]
    enc = runner.pad([r.ids for r in reqs])
    table = HashTable({0: torch.zeros(1, 3, 1, dtype=torch.long)}, {0: torch.ones(1, 3)})  # one row for two
    worker.step(HashedBatch(reqs, enc, table, 0.0), now=2.0)
    assert [outcome(loop, r) for r in reqs] == ["DeadlineExceeded", "IndexError"]
    assert errors(metrics, "infer") == 1


# ---------------------------------------------------------------------------------------------- a worker dies


def pipeline_with(runner, metrics=None) -> Pipeline:
    return Pipeline(runner, metrics or Metrics(), max_batch_size=2, max_wait_s=0.001)


@pytest.mark.parametrize("fault", ["build_hash_table", "classify_ids"])
def test_a_dead_worker_fails_every_pending_request_and_the_pipeline_stops(loop, caplog, fault):
    runner = FaultyRunner(**{fault: Crash("injected")})
    runner.gate = threading.Event()  # holds the first batch in the model while the others queue
    pipeline = pipeline_with(runner)
    failures = []
    pipeline.on_failure = failures.append
    reqs = [request(loop, i, deadline=time.monotonic() + 100) for i in range(7)]
    pipeline.submit_many(reqs)
    with caplog.at_level(logging.CRITICAL, logger="sida"):
        pipeline.start()
        time.sleep(0.05)  # batches queue up behind the first
        runner.gate.set()
        t0 = time.monotonic()
        while pipeline.failure is None and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        done = threading.Thread(target=pipeline.stop)
        done.start()
        done.join(5)
    assert not done.is_alive(), "stop() must return once a worker has died"
    worker = "batch" if fault == "build_hash_table" else "inference"
    assert failures == [pipeline.failure] and pipeline.failure.startswith(f"the {worker} worker stopped: Crash")
    loop.run_until_complete(asyncio.sleep(0))
    assert all(r.future.done() for r in reqs)
    answers = [r.future.exception() for r in reqs]
    assert all(isinstance(e, PipelineFailed) and str(e) == pipeline.failure for e in answers), answers
    assert "Traceback" in caplog.text and "injected" in caplog.text
    with pytest.raises(PipelineFailed):
        pipeline.submit_many([request(loop, 9, deadline=time.monotonic() + 100)])


# ---------------------------------------------------------------------------------------------- through HTTP


def crashing_app(runner: FaultyRunner):
    opts = ServeOptions(
        MODEL, max_input_tokens=64, request_timeout_s=10, max_body_bytes=10_000, api_key=None, body_timeout_s=30
    )
    metrics = Metrics()
    return build_app(opts, lambda: (runner, pipeline_with(runner, metrics), metrics, {"model": MODEL}))


def post_classify(post, n: int, runner: FaultyRunner, pipeline) -> list:
    """`n` classify calls at once (one input each), from threads; the first batch is held in the model until
    `pipeline()` (once built) has accepted all of them."""
    runner.gate = threading.Event()
    body = {"model": MODEL, "input": "a movie ."}
    with ThreadPoolExecutor(n) as pool:
        calls = [pool.submit(post, "/v1/classify", json=body) for _ in range(n)]
        t0 = time.monotonic()
        while (pipeline() is None or pipeline().unanswered < n) and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        runner.gate.set()
        return [c.result() for c in calls]


def test_readiness_turns_503_and_pending_calls_get_503_when_a_worker_dies():
    runner = FaultyRunner(classify_ids=Crash("injected"))
    with TestClient(crashing_app(runner)) as client:
        assert client.get("/health/ready").status_code == 200
        answers = post_classify(client.post, 4, runner, lambda: client.app.state.sida.pipeline)
        assert [r.status_code for r in answers] == [503] * 4
        assert all(r.json()["error"]["code"] == "worker_failed" for r in answers)
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and "inference worker stopped" in ready.json()["error"]["message"]
        assert client.post("/v1/classify", json={"model": MODEL, "input": "x"}).status_code == 503


def test_serve_exits_non_zero_when_a_worker_dies(monkeypatch, demo_dir):
    """`sida serve` (uvicorn in this process) with a pipeline whose inference worker dies on its first batch."""
    runner = FaultyRunner(classify_ids=Crash("injected"))
    app = crashing_app(runner)
    monkeypatch.setattr(cli, "app_from_settings", lambda settings, hash_source, preload: app)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    answers: list = []

    def client() -> None:
        for _ in range(200):
            try:
                if httpx.get(base + "/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        with httpx.Client(base_url=base, timeout=20) as http:
            answers.extend(post_classify(http.post, 3, runner, lambda: app.state.sida.pipeline))

    caller = threading.Thread(target=client)
    caller.start()
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--model", str(demo_dir), "--port", str(port), "--log-level", "warning"])
    caller.join(10)
    assert exit_.value.code == cli.EXIT_WORKER_FAILED != 0
    assert time.monotonic() - t0 < 15
    assert [r.status_code for r in answers] == [503] * 3
