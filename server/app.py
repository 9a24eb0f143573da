"""The HTTP front end (FastAPI): OpenAI-style completions, classification, health, info and metrics.

Handlers validate and tokenize, hand `Request`s to the pipeline and await their futures; every error
leaves in the `{"error": {message, type, param, code}}` envelope with the status of DESIGN.md §6.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers

from sida.offload.datasets import get_task
from sida.server.pipeline import Pipeline
from sida.server.request import DeadlineExceeded, QueueFull, Request
from sida.server.schemas import ClassifyRequest, CompletionRequest, error_body

log = logging.getLogger("sida")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status,
            message,
            type_,
            param,
            code,
            headers,
        )


@dataclass(frozen=True)
class ServeOptions:
    model_name: str
    max_input_tokens: int
    request_timeout_s: float
    max_body_bytes: int
    api_key: str | None


class State:
    def __init__(self):
        self.ready = False
        self.draining = False
        self.runner = None
        self.pipeline: Pipeline | None = None
        self.metrics = None
        self.info: dict = {}


def build_app(opts: ServeOptions, setup, teardown=None) -> FastAPI:
    """`setup()` → (runner, pipeline, metrics, info) runs in the lifespan (nothing heavy at import)."""
    state = State()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.runner, state.pipeline, state.metrics, state.info = await asyncio.to_thread(setup)
        state.pipeline.start()
        state.ready = True
        log.info("sida ready: %s", json.dumps(state.info))
        try:
            yield
        finally:
            state.draining = True
            state.ready = False
            await asyncio.to_thread(state.pipeline.stop)  # everything accepted is answered first
            if teardown is not None:
                teardown()

    app = FastAPI(title="sida", lifespan=lifespan)
    app.state.sida = state

    def envelope(err: APIError) -> JSONResponse:
        return JSONResponse(error_body(err.message, err.type, err.param, err.code), err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return envelope(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err: RequestValidationError):
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = loc[0] if loc else None
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            msg, param = "request body is not valid JSON", None
        return envelope(APIError(400, f"{param + ': ' if param else ''}{msg}", "invalid_request_error", param))

    class Guard:
        """Size limit (413), API key (401), readiness (503) and the request metrics, as a pure ASGI middleware
        (Starlette's `@app.middleware("http")` costs about as much per request as the rest of the handler)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            t0 = time.perf_counter()
            path = scope["path"]
            status = 500

            async def send_status(message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                err = self.refuse(scope, path)
                if err is not None:
                    await envelope(err)(scope, receive, send_status)
                else:
                    await self.inner(scope, receive, send_status)
            finally:
                if state.metrics is not None and path.startswith("/v1/"):
                    state.metrics.requests.labels(path, str(status)).inc()
                    state.metrics.request_duration.labels(path).observe(time.perf_counter() - t0)

        @staticmethod
        def refuse(scope, path: str) -> APIError | None:
            headers = Headers(scope=scope)
            if scope["method"] == "POST":
                length = headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > opts.max_body_bytes:
                    return APIError(413, f"request body over {opts.max_body_bytes} bytes", "invalid_request_error")
            if path.startswith("/v1/") and opts.api_key is not None:
                auth = headers.get("authorization", "")
                token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
                if not hmac.compare_digest(token.encode(), opts.api_key.encode()):
                    return APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
            if path.startswith("/v1/") and scope["method"] == "POST" and not state.ready:
                return APIError(
                    503, "server is starting or draining", "service_unavailable", headers={"Retry-After": "1"}
                )
            return None

    app.add_middleware(Guard)

    def check_model(name: str) -> None:
        if name != opts.model_name:
            raise APIError(
                404,
                f"model {name!r} not found; this server serves {opts.model_name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def tokenize(texts: list[str], param: str) -> list[list[int]]:
        ids = state.runner.tokenize(texts)
        for i, x in enumerate(ids):
            if len(x) > opts.max_input_tokens:
                raise APIError(
                    400,
                    f"{param}[{i}] has {len(x)} tokens; the limit is {opts.max_input_tokens}",
                    "invalid_request_error",
                    param,
                    "context_length_exceeded",
                )
        return ids

    def submit(reqs: list[Request]) -> None:
        try:
            state.pipeline.submit_many(reqs)
        except QueueFull:
            raise APIError(
                429,
                "the request queue is full; retry shortly",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None

    async def wait(reqs: list[Request], deadline: float) -> list:
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(r.future for r in reqs)), max(0.0, deadline - time.monotonic())
            )
        except (asyncio.TimeoutError, DeadlineExceeded):
            raise APIError(
                504,
                f"the request did not finish within {opts.request_timeout_s} s",
                "timeout_error",
                code="deadline_exceeded",
            ) from None

    def new_requests(kind, ids, key, params, on_text=None) -> tuple[list[Request], float]:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + opts.request_timeout_s
        reqs = [
            Request(kind, x, key, params, deadline, loop, loop.create_future(), on_text[i] if on_text else None)
            for i, x in enumerate(ids)
        ]
        return reqs, deadline

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        check_model(body.model)
        task = get_task(body.task)
        ids = tokenize([task.prompt(*texts) for texts in body.inputs], "input")
        reqs, deadline = new_requests("classify", ids, ("classify", task.name), {"task": task})
        submit(reqs)
        results = await wait(reqs, deadline)
        prompt_tokens = sum(len(x) for x in ids)
        state.metrics.tokens.labels("prompt").inc(prompt_tokens)
        body = {
            "object": "list",
            "model": opts.model_name,
            "data": [{"index": i, "label": r.label, "probs": r.probs} for i, r in enumerate(results)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return JSONResponse(body)  # plain JSON types already: skips FastAPI's per-field encoding

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        ids = tokenize(body.prompts, "prompt")
        params = {
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "seed": body.seed,
            "stops": body.stops,
        }
        key = ("complete", body.max_tokens, body.temperature, body.top_p, body.seed, tuple(body.stops))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            reqs, deadline = new_requests("complete", ids, key, params)
            submit(reqs)
            results = await wait(reqs, deadline)
            usage = _usage(results)
            state.metrics.tokens.labels("prompt").inc(usage["prompt_tokens"])
            state.metrics.tokens.labels("completion").inc(usage["completion_tokens"])
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": opts.model_name,
                "choices": [
                    {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                    for i, r in enumerate(results)
                ],
                "usage": usage,
            }
        return stream(ids, key, params, cid, created)

    def stream(ids, key, params, cid, created) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()

        def callback(i: int):
            return lambda delta: loop.call_soon_threadsafe(chunks.put_nowait, (i, delta))

        callbacks = [callback(i) for i in range(len(ids))]
        reqs, deadline = new_requests("complete", ids, key, params, callbacks)
        submit(reqs)  # 429 before the stream starts
        t0 = time.perf_counter()

        def event(choices) -> str:
            return (
                "data: "
                + json.dumps(
                    {
                        "id": cid,
                        "object": "text_completion",
                        "created": created,
                        "model": opts.model_name,
                        "choices": choices,
                    }
                )
                + "\n\n"
            )

        async def gen():
            done = asyncio.ensure_future(asyncio.gather(*(r.future for r in reqs)))
            first = True
            while True:
                getter = asyncio.ensure_future(chunks.get())
                finished, _ = await asyncio.wait(
                    {getter, done}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
                )
                if getter in finished:
                    i, delta = getter.result()
                    if first:
                        state.metrics.ttft.observe(time.perf_counter() - t0)
                        first = False
                    yield event([{"index": i, "text": delta, "logprobs": None, "finish_reason": None}])
                    continue
                getter.cancel()
                if done in finished:
                    while not chunks.empty():
                        i, delta = chunks.get_nowait()
                        yield event([{"index": i, "text": delta, "logprobs": None, "finish_reason": None}])
                    try:
                        results = done.result()
                    except Exception as e:  # noqa: BLE001 — reported in-stream, the HTTP status is already sent
                        yield "data: " + json.dumps(error_body(str(e), "server_error")) + "\n\n"
                        break
                    yield event(
                        [
                            {"index": i, "text": "", "logprobs": None, "finish_reason": r.finish_reason}
                            for i, r in enumerate(results)
                        ]
                    )
                    usage = _usage(results)
                    state.metrics.tokens.labels("prompt").inc(usage["prompt_tokens"])
                    state.metrics.tokens.labels("completion").inc(usage["completion_tokens"])
                    break
                yield (
                    "data: "
                    + json.dumps(error_body("deadline exceeded", "timeout_error", code="deadline_exceeded"))
                    + "\n\n"
                )
                break
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": opts.model_name, "object": "model", "owned_by": "sida", "created": 0}],
        }

    @app.get("/health/live")
    async def live():
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        if not state.ready:
            status = "draining" if state.draining else "starting"
            return JSONResponse(error_body(f"server is {status}", "service_unavailable"), 503)
        return {"status": "ready"}

    @app.get("/info")
    async def info():
        engine = state.runner.engine if state.runner is not None else None
        return {
            **state.info,
            "ready": state.ready,
            "queue_depth": state.pipeline.pending if state.pipeline else 0,
            "offload": engine.summary() if engine is not None else None,
        }

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _usage(results) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def app_from_settings(settings, hash_source: str = "auto") -> FastAPI:
    """The app `sida serve` runs; tests build it the same way."""
    name = settings.served_model_name or settings.model_dir.name

    def setup():
        from importlib.metadata import version

        from sida.offload.device import resolve_device
        from sida.server.composition import build_runner
        from sida.server.metrics import Metrics

        threads = (settings.threads, settings.predictor_threads)
        if resolve_device(settings.device).type == "cpu":
            # The workers compute at the same time, beside the event loop: the inference worker gets half the
            # cores, the predictor one thread (its LSTM steps are too small to use more). On 2 cores, 2 inference
            # threads give 0.6x the HTTP throughput of 1 (bench/http_vs_eval.py, --server-threads).
            threads = (settings.threads or max(1, (os.cpu_count() or 2) // 2), settings.predictor_threads or 1)
        runner = build_runner(settings, hash_source)
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
            threads=threads,
        )
        runner.classify(["warm-up"])  # the first forward happens outside any request's latency
        engine.reset_stats()
        info = {
            "model": name,
            "model_dir": str(settings.model_dir),
            "fingerprint": runner.loaded.fingerprint,
            "device": str(runner.device),
            "predictor": runner.hash_fn is not None,
        }
        return runner, pipeline, metrics, info

    opts = ServeOptions(
        name, settings.max_input_tokens, settings.request_timeout_s, settings.max_body_bytes, settings.api_key
    )
    return build_app(opts, setup)
