"""The router alone, on a bare FastAPI app with fake state (no model, no worker threads): response shapes,
the error envelope of each refusal, the SSE stream, and the response models in the OpenAPI document."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sida.offload.tasks import get_task
from sida.server.app import build_app
from sida.server.errors import add_exception_handlers
from sida.server.metrics import Metrics
from sida.server.request import DeadlineExceeded, QueueFull
from sida.server.routes import router
from sida.server.schemas import ClassifyResponse, CompletionChunk, CompletionResponse, ErrorResponse, ModelList
from sida.server.state import ServeOptions, State
from tests.server.fakes import FakeRunner

MODEL = "fake-moe"
OPTS = ServeOptions(
    MODEL, max_input_tokens=8, request_timeout_s=0.2, max_body_bytes=1000, api_key=None, body_timeout_s=30
)


@dataclass
class Label:
    label: str
    probs: dict[str, float]


@dataclass
class Text:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class FakePipeline:
    """Answers every request at once on the event loop: 'positive' for classify, 'a b' streamed for complete.
    `refuse` is raised by submit_many; `fail` settles every future with it; `hang` leaves them unsettled."""

    refuse: Exception | None = None
    fail: Exception | None = None
    hang: bool = False
    seen: list = field(default_factory=list)
    max_queue: int = 256
    queue_depth: int = 0

    def submit_many(self, reqs) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.seen.extend(reqs)
        for r in reqs:
            if self.hang:
                continue
            if self.fail is not None:
                r.resolve(error=self.fail)
            elif r.kind == "classify":
                r.resolve(Label("positive", {"negative": 0.25, "positive": 0.75}))
            else:
                for delta in ("a", " b"):
                    if r.on_text is not None:
                        r.on_text(delta)
                r.resolve(Text("a b", len(r.ids), 2, "length"))

    def start(self) -> None:
        pass

    def stop(self, timeout: float | None = None) -> bool:
        return True


def bare_app(pipeline: FakePipeline, opts: ServeOptions = OPTS) -> tuple[FastAPI, State]:
    """The router and the error handlers, without the middleware or the lifespan."""
    app = FastAPI()
    add_exception_handlers(app)
    app.include_router(router)
    state = State(opts)
    state.runner, state.pipeline, state.metrics, state.ready = FakeRunner(), pipeline, Metrics(), True
    app.state.sida = state
    return app, state


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return ErrorResponse.model_validate(r.json()).error.model_dump()


def test_classify_answers_a_classify_response_and_counts_prompt_tokens():
    app, state = bare_app(FakePipeline())
    r = TestClient(app).post("/v1/classify", json={"model": MODEL, "input": ["good film", "bad one ."]})
    assert r.status_code == 200, r.text
    body = ClassifyResponse.model_validate(r.json())
    assert [(d.index, d.label) for d in body.data] == [(0, "positive"), (1, "positive")]
    words = sum(len(get_task("sst2").prompt(t).split()) for t in ("good film", "bad one ."))  # the task's prompts
    assert body.usage.prompt_tokens == body.usage.total_tokens == words
    assert r.json()["usage"] == {"prompt_tokens": words, "total_tokens": words}
    assert [req.kind for req in state.pipeline.seen] == ["classify", "classify"]
    assert state.metrics.tokens.labels("prompt")._value.get() == words


def test_completion_answers_a_completion_response():
    app, _ = bare_app(FakePipeline())
    r = TestClient(app).post("/v1/completions", json={"model": MODEL, "prompt": ["one two", "three"]})
    assert r.status_code == 200, r.text
    body = CompletionResponse.model_validate(r.json())
    assert body.id.startswith("cmpl-") and body.model == MODEL
    assert [(c.index, c.text, c.finish_reason) for c in body.choices] == [(0, "a b", "length"), (1, "a b", "length")]
    assert r.json()["choices"][0]["logprobs"] is None
    assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_stream_sends_chunks_then_the_finish_reason_then_done():
    app, state = bare_app(FakePipeline())
    with TestClient(app).stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "x y", "stream": True}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        raw = "".join(s.iter_text())
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [CompletionChunk.model_validate_json(e) for e in events[:-1]]
    assert "".join(c.choices[0].text for c in chunks) == "a b"
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "length"]
    assert state.metrics.tokens.labels("completion")._value.get() == 2


def test_a_failure_after_the_stream_started_is_an_error_event():
    app, _ = bare_app(FakePipeline(fail=RuntimeError("the worker broke")))
    with TestClient(app).stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}) as s:
        events = [e for e in "".join(s.iter_text()).split("\n\n") if e]
    assert s.status_code == 200
    assert json.loads(events[0].removeprefix("data: "))["error"]["message"] == "the worker broke"
    assert events[-1] == "data: [DONE]"


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/completions"])
def test_unknown_model_is_404(path):
    app, _ = bare_app(FakePipeline())
    payload = {"model": "gpt-4", "input": "x", "prompt": "x"}
    err = error_of(TestClient(app).post(path, json=payload), 404)
    assert err["param"] == "model" and err["code"] == "model_not_found"


def test_too_many_tokens_is_400_naming_the_input():
    app, _ = bare_app(FakePipeline())
    err = error_of(TestClient(app).post("/v1/classify", json={"model": MODEL, "input": ["ok", "w " * 9]}), 400)
    assert err["param"] == "input" and err["code"] == "context_length_exceeded" and "input[1]" in err["message"]


def test_a_full_queue_is_429_with_retry_after():
    app, _ = bare_app(FakePipeline(refuse=QueueFull()))
    for payload in ({"input": "x"}, {"prompt": "x"}, {"prompt": "x", "stream": True}):
        path = "/v1/classify" if "input" in payload else "/v1/completions"
        r = TestClient(app).post(path, json={"model": MODEL, **payload})
        assert error_of(r, 429)["code"] == "queue_full" and r.headers["retry-after"] == "1"


@pytest.mark.parametrize("pipeline", [FakePipeline(hang=True), FakePipeline(fail=DeadlineExceeded())])
def test_a_missed_deadline_is_504(pipeline):
    app, _ = bare_app(pipeline, ServeOptions(MODEL, 8, 0.05, 1000, None, 30))
    err = error_of(TestClient(app).post("/v1/classify", json={"model": MODEL, "input": "x"}), 504)
    assert err["type"] == "timeout_error" and err["code"] == "deadline_exceeded"


def test_models_health_and_info_before_setup():
    app = FastAPI()
    app.include_router(router)
    app.state.sida = State(OPTS)
    c = TestClient(app)
    assert ModelList.model_validate(c.get("/v1/models").json()).data[0].id == MODEL
    assert c.get("/health/live").json() == {"status": "ok"}
    assert error_of(c.get("/health/ready"), 503)["message"] == "server is starting"
    info = {"ready": False, "fault": None, "watchdog": None, "queue_depth": 0, "offload": None, "decode": None}
    assert c.get("/info").json() == info
    assert c.get("/metrics").text == ""


def test_the_guard_refuses_before_the_handlers():
    """build_app's wiring, with a setup that returns the fakes: 401, 413 and the request metrics."""
    opts = ServeOptions(MODEL, 8, 1.0, 100, api_key="k", body_timeout_s=30)
    metrics = Metrics()
    app = build_app(opts, lambda: (FakeRunner(), FakePipeline(), metrics, {"model": MODEL}))
    with TestClient(app) as c:
        assert error_of(c.post("/v1/classify", json={"model": MODEL, "input": "x"}), 401)["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer k"}
        assert (
            error_of(c.post("/v1/classify", content=b"x" * 101, headers=auth), 413)["type"] == "invalid_request_error"
        )
        assert c.post("/v1/classify", json={"model": MODEL, "input": "x"}, headers=auth).status_code == 200
        assert c.get("/health/live").status_code == 200  # no key needed
        assert c.get("/info").json()["model"] == MODEL
    assert metrics.requests.labels("/v1/classify", "401")._value.get() == 1
    assert metrics.requests.labels("/v1/classify", "200")._value.get() == 1


def test_openapi_shows_the_response_models():
    app = build_app(OPTS, lambda: None)
    doc = TestClient(app).get("/openapi.json").json()

    def schema(path: str, method: str, status: str, media: str = "application/json") -> dict:
        return doc["paths"][path][method]["responses"][status]["content"][media]["schema"]

    assert schema("/v1/classify", "post", "200")["$ref"] == "#/components/schemas/ClassifyResponse"
    assert schema("/v1/classify", "post", "429")["$ref"] == "#/components/schemas/ErrorResponse"
    assert schema("/v1/completions", "post", "200")["$ref"] == "#/components/schemas/CompletionResponse"
    assert schema("/v1/completions", "post", "200", "text/event-stream")["title"] == "CompletionChunk"
    assert schema("/v1/models", "get", "200")["$ref"] == "#/components/schemas/ModelList"
    assert schema("/health/ready", "get", "200")["$ref"] == "#/components/schemas/HealthStatus"
    assert {"ClassifyItem", "CompletionChoice", "Usage", "ErrorDetail"} <= set(doc["components"]["schemas"])
