"""The HTTP front end's wiring: the lifespan that runs setup and drains on shutdown, and `build_app`, which puts
the state, the error handlers, the `Guard` middleware and the routes together.

The handlers are in routes.py, the middleware in middleware.py, the SSE stream in streaming.py and the error
envelope in errors.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from importlib.metadata import version

from fastapi import FastAPI
from starlette.routing import Route

from sida.offload.contracts import ServingRunner
from sida.offload.device import resolve_device
from sida.offload.runner import Runner
from sida.server.composition import attach_decode_batch, build_runner
from sida.server.errors import add_exception_handlers
from sida.server.metrics import Metrics
from sida.server.middleware import Guard
from sida.server.pipeline import Pipeline
from sida.server.routes import router
from sida.server.settings import Settings
from sida.server.state import ServeOptions, State
from sida.server.watchdog import StepWatchdog

log = logging.getLogger("sida")

STOP_MARGIN_S = 5.0  # past the drain's deadline, how long a stop waits for the workers' threads

Setup = Callable[[], tuple[ServingRunner, Pipeline, Metrics, dict]]  # → (runner, pipeline, metrics, info)


@asynccontextmanager
async def lifespan(app: FastAPI, setup: Setup, teardown: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """Run `setup` off the event loop, start the pipeline and turn ready; on shutdown answer everything accepted,
    then stop."""
    state: State = app.state.sida
    state.runner, state.pipeline, state.metrics, state.info = await asyncio.to_thread(setup)
    state.pipeline.on_failure = state.fail  # a worker that stops turns the server unready (it then exits)
    state.pipeline.start()
    state.ready = not state.draining and state.failure is None
    log.info("sida ready: %s", json.dumps(state.info))
    try:
        yield
    finally:
        state.begin_drain()
        # everything accepted is answered first, until the drain's deadline; a stuck step is left to the exit
        timeout = max(0.0, state.drain_deadline - time.monotonic()) + STOP_MARGIN_S
        if not await asyncio.to_thread(state.pipeline.stop, timeout):
            state.fail(f"the pipeline did not stop within {timeout:.0f} s: {state.fault or 'a step still runs'}")
        elif (engine := getattr(state.runner, "engine", None)) is not None:
            engine.close()  # the disk tier's I/O threads and expert file (no step runs any more)
        if teardown is not None:
            teardown()


def build_app(
    opts: ServeOptions,
    setup: Setup,
    teardown: Callable[[], None] | None = None,
) -> FastAPI:
    """The app; `setup()` → (runner, pipeline, metrics, info) runs in the lifespan (nothing heavy at import)."""
    app = FastAPI(title="sida", lifespan=partial(lifespan, setup=setup, teardown=teardown))
    state = State(opts)
    app.state.sida = state
    add_exception_handlers(app)
    app.include_router(router)
    endpoints = frozenset(r.path for r in (*app.routes, *router.routes) if isinstance(r, Route))
    app.add_middleware(Guard, state=state, endpoints=endpoints)
    return app


def serving_setup(settings: Settings, name: str, hash_source: str) -> tuple[Runner, Pipeline, Metrics, dict]:
    """The runner, pipeline, metrics and info `sida serve` runs with, warmed up. `info["hash"]` names what builds
    the hash tables: "predictor", "oracle" or None."""
    torch_threads = (settings.torch_threads, settings.hash_torch_threads)
    if resolve_device(settings.device).type == "cpu":
        # The workers compute at the same time, beside the event loop: the inference worker gets half the
        # cores, the batch worker one thread (the predictor's LSTM steps are too small to use more). On 2 cores,
        # 2 inference threads give less HTTP throughput than 1 (bench/http_vs_eval.py, --server-torch-threads).
        inference = settings.torch_threads or max(1, (os.cpu_count() or 2) // 2)
        torch_threads = (inference, settings.hash_torch_threads or 1)
    runner = build_runner(settings, hash_source)
    batching = attach_decode_batch(runner, settings)
    engine = runner.engine
    mode = engine.cfg.mode if engine.cache is not None else "resident"
    metrics = Metrics(engine, name, mode, version("sida"))
    pipeline = Pipeline(
        runner,
        metrics,
        settings.max_batch_size,
        settings.max_batch_tokens,
        settings.max_batch_wait_ms / 1000,
        settings.max_queue,
        shadow_sample_rate=settings.shadow_sample_rate,
        torch_threads=torch_threads,
        watchdog=StepWatchdog(settings.step_timeout_s, settings.request_timeout_s, on_stuck=metrics.stuck_steps.inc),
    )
    runner.complete(["warm-up"], max_new_tokens=1)  # the first forward happens outside any request's latency
    engine.reset_stats()
    info = {
        "model": name,
        "family": runner.loaded.family,
        "model_dir": str(settings.model_dir),
        "fingerprint": runner.loaded.fingerprint,
        "device": str(runner.device),
        "batching": batching,
        "hash": None if runner.hash_fn is None else "oracle" if hash_source == "oracle" else "predictor",
    }
    return runner, pipeline, metrics, info


def app_from_settings(settings: Settings, hash_source: str = "auto", preload: bool = False) -> FastAPI:
    """The app `sida serve` runs; tests build it the same way. `preload` runs the setup now, so that a model,
    predictor or expert_dir that cannot be used raises here, to the caller, rather than in the lifespan."""
    name = settings.served_model_name or settings.model_dir.name
    opts = ServeOptions(
        name,
        settings.max_input_tokens,
        settings.request_timeout_s,
        settings.max_body_bytes,
        settings.api_key,
        settings.body_timeout_s,
        settings.drain_timeout_s,
    )
    setup = partial(serving_setup, settings, name, hash_source)
    if preload:
        built = setup()
        return build_app(opts, lambda: built)
    return build_app(opts, setup)
