"""A stuck inference step: the watchdog notices it (readiness 503 with the reason, `/info`, counted, logged with the
stuck thread's stack), readiness comes back if the step ends, and SIGTERM ends `sida serve` within the drain timeout
and a margin, non-zero, though the step never ends."""

from __future__ import annotations

import logging
import signal
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from sida.server import cli
from sida.server.app import STOP_MARGIN_S, build_app
from sida.server.metrics import Metrics
from sida.server.pipeline import Pipeline
from sida.server.state import ServeOptions
from sida.server.watchdog import StepWatchdog
from tests.live_server import free_port, ready
from tests.server.test_worker_faults import MODEL, FaultyRunner


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_step_past_the_limit_is_counted_once_logged_with_its_stack_and_cleared_when_it_ends(caplog):
    clock, stuck = Clock(), []
    dog = StepWatchdog(None, floor_s=10.0, margin=5.0, on_stuck=lambda: stuck.append(1), clock=clock)
    with dog.step("decode"):
        clock.now = 9.0
        assert dog.check() is None
        clock.now = 10.5
        with caplog.at_level(logging.ERROR, logger="sida"):
            reason = dog.check()
        assert reason == "the inference decode step has run 10 s (limit 10 s)" == dog.stuck
        assert dog.check() == reason and stuck == [1] and dog.stuck_steps == 1  # once per stuck step
        assert "test_a_step_past_the_limit" in caplog.text  # the stack of the thread inside the step
    assert dog.stuck is None and dog.slowest_s == 10.5
    assert dog.limit_s == 52.5  # 5 × the slowest step measured, above the floor


def test_a_fixed_limit_wins_and_an_idle_thread_is_never_stuck():
    clock = Clock()
    dog = StepWatchdog(0.5, floor_s=60.0, clock=clock)
    clock.now = 100.0
    assert dog.check() is None and dog.limit_s == 0.5
    with dog.step("batch"):
        clock.now = 100.6
        assert dog.check() is not None


class HangingRunner(FaultyRunner):
    """classify_ids waits on `release` (set by the test)."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def classify_ids(self, enc, task, hash_table=None, shadow=False):
        self.entered.set()
        self.release.wait(60)
        return super().classify_ids(enc, task, hash_table, shadow)


def hanging_app(runner: HangingRunner, step_timeout_s: float, request_timeout_s: float = 30.0):
    opts = ServeOptions(MODEL, 64, request_timeout_s, 10_000, None, 30, drain_timeout_s=request_timeout_s + 1)
    metrics = Metrics()
    dog = StepWatchdog(step_timeout_s, request_timeout_s, on_stuck=metrics.stuck_steps.inc)
    pipeline = Pipeline(runner, metrics, max_batch_size=2, max_wait_s=0.001, watchdog=dog)
    return build_app(opts, lambda: (runner, pipeline, metrics, {"model": MODEL}))


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s
        time.sleep(0.02)


def test_readiness_turns_503_while_a_step_is_stuck_and_back_when_it_ends():
    runner = HangingRunner()
    with TestClient(hanging_app(runner, step_timeout_s=0.2)) as client:
        assert client.get("/health/ready").status_code == 200
        call = threading.Thread(
            target=client.post, args=("/v1/classify",), kwargs={"json": {"model": MODEL, "input": "a film ."}}
        )
        call.start()
        wait_for(lambda: client.get("/health/ready").status_code == 503)
        body = client.get("/health/ready").json()["error"]
        assert body["code"] == "fault" and "inference batch step has run" in body["message"]
        info = client.get("/info").json()
        assert info["ready"] is False and info["fault"].startswith("the inference batch step")
        assert info["watchdog"]["limit_s"] == 0.2 and info["watchdog"]["stuck"] == info["fault"]
        assert "sida_stuck_steps_total 1.0" in client.get("/metrics").text
        refused = client.post("/v1/classify", json={"model": MODEL, "input": "x"})  # would wait for its deadline
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "fault"
        assert refused.headers["retry-after"] == "1"
        runner.release.set()
        call.join(10)
        wait_for(lambda: client.get("/health/ready").status_code == 200)
        assert client.get("/info").json()["fault"] is None


def test_sigterm_ends_serve_non_zero_within_the_drain_timeout_though_a_step_never_ends(monkeypatch, demo_dir):
    runner, request_timeout_s = HangingRunner(), 1.0
    app = hanging_app(runner, step_timeout_s=0.2, request_timeout_s=request_timeout_s)
    monkeypatch.setattr(cli, "app_from_settings", lambda settings, hash_source, preload: app)
    port = free_port()
    base, answers, sent = f"http://127.0.0.1:{port}", [], []

    def client() -> None:
        wait_for(lambda: ready(base), 60)
        answers.append(httpx.post(base + "/v1/classify", json={"model": MODEL, "input": "a film ."}, timeout=20))
        assert runner.entered.is_set()
        sent.append(time.monotonic())
        signal.raise_signal(signal.SIGTERM)

    caller = threading.Thread(target=client)
    caller.start()
    flags = ["--model", str(demo_dir), "--port", str(port), "--log-level", "warning"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", *flags, "--request-timeout-s", str(request_timeout_s)])
    ended = time.monotonic()
    caller.join(5)
    runner.release.set()
    assert exit_.value.code == cli.EXIT_WORKER_FAILED
    assert [r.status_code for r in answers] == [504]
    drain_timeout_s = request_timeout_s + 5.0  # Settings.drain_timeout_s
    assert ended - sent[0] < drain_timeout_s + STOP_MARGIN_S + 3.0


class CorruptRunner(FaultyRunner):
    """An engine whose expert file holds an expert it could not repair (`OffloadEngine.fault`)."""

    class engine:  # noqa: N801 — stands in for the runner's engine attribute
        fault = "/srv/experts/abc-float32.safetensors: expert (3, 1) does not match its checksum and cannot be repaired"

        @staticmethod
        def summary() -> dict:
            return {}

        @staticmethod
        def close() -> None:
            pass


def test_an_expert_that_cannot_be_repaired_turns_readiness_503_naming_the_file():
    metrics = Metrics()
    runner = CorruptRunner()
    pipeline = Pipeline(runner, metrics, max_batch_size=2, max_wait_s=0.001)
    opts = ServeOptions(MODEL, 64, 30.0, 10_000, None, 30)
    with TestClient(build_app(opts, lambda: (runner, pipeline, metrics, {"model": MODEL}))) as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "fault"
        assert "abc-float32.safetensors: expert (3, 1)" in ready.json()["error"]["message"]
        assert client.get("/info").json()["fault"] == CorruptRunner.engine.fault
        taken = client.post("/v1/classify", json={"model": MODEL, "input": "a film ."})  # only its batches fail
        assert taken.status_code == 200
