"""The HTTP API's handlers: OpenAI-style completions and chat completions, classification, models, health, info
and metrics.

Each reads what it needs from `request.app.state.sida` (a `State`); the `/v1/` handlers validate and tokenize,
hand `Request`s to the pipeline and await their futures. Errors are raised as `APIError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from sida.offload.sampling import Sampling
from sida.offload.tasks import get_task
from sida.server.chat import ChatCompletionChunk, ChatCompletionResponse, chat_prompt, chat_response
from sida.server.errors import APIError, invalid
from sida.server.request import DeadlineExceeded, KVCacheTooSmall, PipelineFailed, QueueFull, Request
from sida.server.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    ClassifyResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerationFields,
    HealthStatus,
    ModelCard,
    ModelList,
    Usage,
    error_body,
)
from sida.server.state import ServeOptions, State
from sida.server.streaming import ChatStream, CompletionStream

log = logging.getLogger("sida")
router = APIRouter()


def _sse_content(model: type[BaseModel]) -> dict:
    """`model` as the schema of `text/event-stream` events; its nested models are those in the components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"text/event-stream": {"schema": schema}}


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 429, 500, 503, 504)}
_AUTH_ERRORS = {401: {"model": ErrorResponse}}
_STREAMED = {200: {"content": _sse_content(CompletionChunk)}}  # the streamed form, beside the JSON one
_CHAT_STREAMED = {200: {"content": _sse_content(ChatCompletionChunk)}}


# ---------------------------------------------------------------------------------------------- shared steps


def check_model(opts: ServeOptions, name: str) -> None:
    """404 unless `name` is the served model."""
    if name != opts.model_name:
        raise APIError(
            404,
            f"model {name!r} not found; this server serves {opts.model_name!r}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )


def check_count(state: State, n: int, param: str, what: str = "inputs") -> None:
    """400 when a call has more inputs than the whole queue holds: it could never be accepted, and a 429 would
    have the client retry it forever."""
    bound = state.pipeline.max_queue
    if n > bound:
        raise APIError(
            400,
            f"{param}: the call has {n} {what}; a call takes at most {bound} (max_queue)",
            "invalid_request_error",
            param,
            "too_many_inputs",
        )


def tokenize(state: State, texts: list[str], param: str) -> list[list[int]]:
    """Token ids of each text; 400 naming `param[i]` if one is over the input limit."""
    check_count(state, len(texts), param)
    limit = state.opts.max_input_tokens
    ids = state.runner.tokenize(texts)
    for i, x in enumerate(ids):
        if len(x) > limit:
            raise APIError(
                400,
                f"{param}[{i}] has {len(x)} tokens; the limit is {limit}",
                "invalid_request_error",
                param,
                "context_length_exceeded",
            )
    return ids


def new_requests(
    opts: ServeOptions, kind: str, ids, key: tuple, params: list[dict], on_text=None
) -> tuple[list, float]:
    """One `Request` per input, with `params[i]`, sharing a deadline `request_timeout_s` from now; `on_text[i]`
    streams input i."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + opts.request_timeout_s
    reqs = [
        Request(kind, x, key, params[i], deadline, loop, loop.create_future(), on_text[i] if on_text else None)
        for i, x in enumerate(ids)
    ]
    return reqs, deadline


def submit(state: State, reqs: list[Request]) -> None:
    """Hand all of a call's requests to the pipeline, or 429 (with Retry-After) if its queue cannot take them."""
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


async def wait(opts: ServeOptions, reqs: list[Request], deadline: float) -> list:
    """The results of `reqs` in order, or 504 once the deadline passes."""
    try:
        return await asyncio.wait_for(asyncio.gather(*(r.future for r in reqs)), max(0.0, deadline - time.monotonic()))
    except (asyncio.TimeoutError, DeadlineExceeded):
        raise APIError(
            504,
            f"the request did not finish within {opts.request_timeout_s} s",
            "timeout_error",
            code="deadline_exceeded",
        ) from None
    except (APIError, PipelineFailed, KVCacheTooSmall):
        raise
    except Exception as e:  # its batch failed: the worker logged the traceback once, with the batch
        raise APIError(500, f"the request's batch failed: {type(e).__name__}: {e}", "server_error") from None


# ---------------------------------------------------------------------------------------------- /v1


@router.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS)
async def classify(body: ClassifyRequest, http: HTTPRequest) -> Response:
    """Label each input with the task's classifier."""
    state: State = http.app.state.sida
    check_model(state.opts, body.model)
    task = get_task(body.task)
    tasks = state.runner.tasks
    if task.name not in tasks:
        raise invalid(
            f"task: {state.opts.model_name} does not serve task {task.name!r}; it serves {tasks}",
            "task",
            "invalid_value",
        )
    ids = tokenize(state, [task.prompt(*texts) for texts in body.inputs], "input")
    reqs, deadline = new_requests(state.opts, "classify", ids, ("classify", task.name), [{"task": task}] * len(ids))
    submit(state, reqs)
    results = await wait(state.opts, reqs, deadline)
    prompt_tokens = sum(len(x) for x in ids)
    state.metrics.tokens.labels("prompt").inc(prompt_tokens)
    answer = {  # a ClassifyResponse as plain JSON types: skips FastAPI's per-field validation and encoding
        "object": "list",
        "model": state.opts.model_name,
        "data": [{"index": i, "label": r.label, "probs": r.probs} for i, r in enumerate(results)],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return JSONResponse(answer)


@router.post("/v1/completions", response_model=CompletionResponse, responses={**_ERRORS, **_STREAMED})
async def completions(body: CompletionRequest, http: HTTPRequest) -> CompletionResponse | Response:
    """Continue each prompt `n` times; with `stream`, as server-sent `CompletionChunk` events."""
    state: State = http.app.state.sida
    opts, n = state.opts, body.n
    check_model(opts, body.model)
    if body.stream and body.logprobs is not None:
        raise invalid("logprobs: not available with stream; ask without stream", "logprobs", "invalid_value")
    ids = tokenize(state, body.prompts, "prompt")
    check_count(state, len(ids) * n, "n", "choices (prompts × n)")  # every choice is one request
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    log_user(cid, body.user)
    sampling = sampling_of(body, body.logprobs)
    if body.stream:
        echo = [echoed(p) for p in body.prompts for _ in range(n)] if body.echo else None
        usage = body.stream_options is not None and body.stream_options.include_usage
        stream = CompletionStream(cid, created, opts.model_name, len(ids) * n, state.metrics, n, echo, usage)
        reqs, deadline = submit_choices(state, ids, body, sampling, stream.callbacks)  # 429 before the stream starts
        return stream.response(reqs, deadline)
    results = await generate(state, ids, body, sampling)
    usage = counted(state, Usage.of(results, n))
    choices = [completion_choice(state, body, i, body.prompts[i // n], r) for i, r in enumerate(results)]
    return CompletionResponse(id=cid, created=created, model=opts.model_name, choices=choices, usage=usage)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_ERRORS, **_CHAT_STREAMED})
async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest) -> ChatCompletionResponse | Response:
    """Answer the chat `n` times, its prompt made by the model's chat template; with `stream`, as server-sent
    `ChatCompletionChunk` events."""
    state: State = http.app.state.sida
    opts = state.opts
    check_model(opts, body.model)
    if body.stream and body.logprobs:
        raise invalid("logprobs: not available with stream; ask without stream", "logprobs", "invalid_value")
    ids = chat_prompt(state, body)
    check_count(state, body.n, "n", "choices")
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    log_user(cid, body.user)
    sampling = sampling_of(body, body.top_k)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        stream = ChatStream(cid, created, opts.model_name, body.n, state.metrics, usage)
        reqs, deadline = submit_choices(state, [ids], body, sampling, stream.callbacks)
        return stream.response(reqs, deadline)
    results = await generate(state, [ids], body, sampling)
    usage = counted(state, Usage.of(results, body.n))
    return chat_response(cid, created, opts.model_name, body.top_k, results, usage)


# ---------------------------------------------------------------------------------------------- generation


def generation_key(state: State, max_tokens: int, sampling: Sampling, stops: list[str], ignore_eos: bool) -> tuple:
    """The batching key of a generated choice: choices with equal keys may share a batch. Under continuous batching
    every choice carries its own parameters into the running batch, so all may share a prefill; a static batch runs
    with one `max_tokens`, `sampling`, stop list and `ignore_eos` (each choice keeps its own seed)."""
    if state.runner.decode_batch is not None:
        return ("complete",)
    return ("complete", max_tokens, sampling, tuple(stops), ignore_eos)


def sampling_of(body: GenerationFields, logprobs: int | None) -> Sampling:
    """How a call's tokens are chosen; `logprobs`: the alternatives per token whose log-probs are recorded."""
    return Sampling(
        body.temperature,
        body.top_p,
        body.presence_penalty,
        body.frequency_penalty,
        body.repetition_penalty,
        logprobs,
    )


def submit_choices(
    state: State, ids: list[list[int]], body: GenerationFields, sampling: Sampling, on_text=None
) -> tuple[list[Request], float]:
    """Submit one request per choice, `body.n` of each prompt's token ids in a row (prompt i's choice j is request
    i * n + j; `on_text[i]` streams request i): 429 if the queue cannot take them all. Choice j samples with seed
    + j, so that the choices differ and each is reproducible."""
    n, max_tokens, stops = body.n, body.max_new_tokens, body.stops
    key = generation_key(state, max_tokens, sampling, stops, body.ignore_eos)
    choice_ids = [x for x in ids for _ in range(n)]
    params = [
        {
            "max_tokens": max_tokens,
            "sampling": sampling,
            "stops": stops,
            "seed": choice_seed(body.seed, j),
            "ignore_eos": body.ignore_eos,
        }
        for _ in ids
        for j in range(n)
    ]
    reqs, deadline = new_requests(state.opts, "complete", choice_ids, key, params, on_text)
    submit(state, reqs)
    return reqs, deadline


async def generate(state: State, ids: list[list[int]], body: GenerationFields, sampling: Sampling) -> list:
    """The results of every choice (see `submit_choices`), in order: 429 when the queue is full, 504 past the
    deadline."""
    reqs, deadline = submit_choices(state, ids, body, sampling)
    return await wait(state.opts, reqs, deadline)


def counted(state: State, usage: Usage) -> Usage:
    """`usage`, once added to the token counters."""
    state.metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
    state.metrics.tokens.labels("completion").inc(usage.completion_tokens)
    return usage


def log_user(cid: str, user: str | None) -> None:
    """`user` is accepted and only logged."""
    if user is not None:
        log.debug("%s: user %r", cid, user)


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of choice j of a call with `seed` (None: each choice draws its own)."""
    return None if seed is None else seed + j


def echoed(prompt: str) -> str:
    """What `echo` puts before a choice's text: the prompt, and a space unless it ends in one (the decoded
    continuation starts a new word without one)."""
    return prompt if prompt[-1:].isspace() else prompt + " "


def completion_choice(state: State, body: CompletionRequest, index: int, prompt: str, r) -> CompletionChoice:
    """The choice of one result: its text (after the prompt with `echo`) and its log-probs when asked for (an
    echoed prompt's tokens have null log-probs: the encoder reads the prompt, nothing predicts it)."""
    head = echoed(prompt) if body.echo else ""
    text = head + r.text
    logprobs = None
    if body.logprobs is not None:
        lp = r.logprobs
        pieces = state.runner.prompt_pieces(prompt) if body.echo else []
        shift = len(head)
        logprobs = CompletionLogprobs(
            tokens=[p for p, _ in pieces] + lp.tokens,
            token_logprobs=[None] * len(pieces) + lp.token_logprobs,
            top_logprobs=[None] * len(pieces) + lp.top_logprobs,
            text_offset=[o for _, o in pieces] + [shift + o for o in lp.text_offset],
        )
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=r.finish_reason)


@router.get("/v1/models", response_model=ModelList, responses=_AUTH_ERRORS)
async def models(http: HTTPRequest) -> ModelList:
    """The one served model and the classification tasks it serves (none listed before setup)."""
    state: State = http.app.state.sida
    tasks = state.runner.tasks if state.runner is not None else []
    family = state.info.get("family") if state.info else None  # what setup reported
    return ModelList(data=[ModelCard(id=state.opts.model_name, family=family, tasks=tasks)])


# ---------------------------------------------------------------------------------------------- operations


@router.get("/health/live", response_model=HealthStatus)
async def live() -> HealthStatus:
    """The process answers."""
    return HealthStatus(status="ok")


@router.get("/health/ready", response_model=HealthStatus, responses={503: {"model": ErrorResponse}})
async def ready(http: HTTPRequest) -> HealthStatus | Response:
    """The model is loaded and the pipeline runs (503 while starting, draining, after a worker failed, and while a
    step is stuck or an expert file cannot be repaired: `State.fault`)."""
    state: State = http.app.state.sida
    if state.failure is not None:
        body = error_body(f"server failed: {state.failure}", "service_unavailable", code="worker_failed")
        return JSONResponse(body, 503)
    if state.ready and (fault := state.fault) is not None:
        return JSONResponse(error_body(f"server cannot serve: {fault}", "service_unavailable", code="fault"), 503)
    if not state.ready:
        status = "draining" if state.draining else "starting"
        return JSONResponse(error_body(f"server is {status}", "service_unavailable"), 503)
    return HealthStatus(status="ready")


@router.get("/info")
async def info(http: HTTPRequest) -> dict:
    """What setup reported (model, fingerprint, device, what builds the hash tables), readiness and its fault, the
    step watchdog, queue depth and the offload engine's summary."""
    state: State = http.app.state.sida
    engine = state.runner.engine if state.runner is not None else None
    decode = state.runner.decode_batch if state.runner is not None else None
    watchdog = getattr(state.pipeline, "watchdog", None)
    return {
        **state.info,
        "ready": state.ready and state.fault is None,
        "fault": state.fault,
        "watchdog": watchdog.summary() if watchdog is not None else None,
        "queue_depth": state.pipeline.queue_depth if state.pipeline else 0,
        "offload": engine.summary() if engine is not None else None,
        "decode": decode.summary() if decode is not None else None,
    }


@router.get("/metrics", response_class=Response)
async def metrics(http: HTTPRequest) -> Response:
    """Prometheus text exposition of the server's registry."""
    state: State = http.app.state.sida
    if state.metrics is None:
        return Response("", media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
