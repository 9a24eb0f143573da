"""`POST /v1/chat/completions`: with the fake runner on a bare app (the answer's shape, what each choice is
submitted with, the streamed events in order, the chat form of log-probs, each refusal), then with the official
openai client against a live server on the decoder-only demo model, whose tokenizer has a chat template."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from sida.offload.model_loader import fingerprint
from sida.offload.runner import Completion, NoChatTemplate
from sida.offload.sampling import Sampling, TokenLogprobs
from sida.server.app import app_from_settings, build_app
from sida.server.chat import ChatCompletionChunk, ChatCompletionResponse
from sida.server.metrics import Metrics
from sida.server.request import QueueFull
from sida.server.routes import generation_key
from sida.server.settings import load_settings
from sida.server.state import ServeOptions
from tests.conftest import REPO
from tests.server.fakes import FakeRunner
from tests.server.test_overload import running
from tests.server.test_routes import MODEL, FakePipeline, bare_app, error_of

URL = "/v1/chat/completions"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
OLMOE = REPO / "models" / "sida-olmoe-demo"
ERROR_504 = {
    "error": {"message": "deadline exceeded", "type": "timeout_error", "param": None, "code": "deadline_exceeded"}
}


def chat(client: TestClient, status: int = 200, **fields):
    r = client.post(URL, json={"model": MODEL, "messages": CHAT, **fields})
    assert r.status_code == status, r.text
    return r


def stream_events(client: TestClient, **fields) -> list:
    """The parsed `data:` events of a streamed call; the last is the string "[DONE]"."""
    with client.stream("POST", URL, json={"model": MODEL, "messages": CHAT, "stream": True, **fields}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        raw = "".join(s.iter_text())
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]] + ["[DONE]"]


# ------------------------------------------------------------------------------ fake runner


def test_a_chat_is_answered_with_a_chat_completion():
    app, state = bare_app(FakePipeline())
    body = chat(TestClient(app), max_tokens=5).json()
    answer = ChatCompletionResponse.model_validate(body)
    assert answer.id.startswith("chatcmpl-") and body["object"] == "chat.completion" and answer.model == MODEL
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "a b"}, "logprobs": None, "finish_reason": "length"}
    ]
    prompt = FakeRunner().chat_ids(CHAT)
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 2, "total_tokens": len(prompt) + 2}
    (req,) = state.pipeline.seen
    assert req.kind == "complete" and req.ids == prompt
    sampling = Sampling(1.0, 1.0, 0.0, 0.0, 1.0, None)
    assert req.params == {"max_tokens": 5, "sampling": sampling, "stops": [], "seed": None, "ignore_eos": False}
    assert req.key == generation_key(state, 5, sampling, [], False)
    assert state.metrics.tokens.labels("completion")._value.get() == 2


def test_text_parts_are_joined_and_every_field_reaches_the_requests():
    app, state = bare_app(FakePipeline())
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    fields = {"n": 3, "seed": 5, "stop": ["x", "y"], "max_tokens": 9, "max_completion_tokens": 4}
    body = chat(TestClient(app), messages=parts, ignore_eos=True, temperature=0.5, **fields).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    prompt = FakeRunner().chat_ids([{"role": "user", "content": "one\ntwo"}])
    assert body["usage"]["prompt_tokens"] == len(prompt)  # the prompt is counted once, not once per choice
    seen = state.pipeline.seen
    assert [r.params["seed"] for r in seen] == [5, 6, 7] and all(r.ids == prompt for r in seen)
    assert {r.params["max_tokens"] for r in seen} == {4}  # max_completion_tokens wins
    assert all(r.params["stops"] == ["x", "y"] and r.params["ignore_eos"] for r in seen)
    assert seen[0].key == generation_key(state, 4, seen[0].params["sampling"], ["x", "y"], True)


def test_completions_pass_ignore_eos_too():
    app, state = bare_app(FakePipeline())
    r = TestClient(app).post("/v1/completions", json={"model": MODEL, "prompt": "x y", "ignore_eos": True})
    assert r.status_code == 200 and state.pipeline.seen[0].params["ignore_eos"] is True


def test_the_stream_opens_each_choice_then_sends_text_then_finish_reasons_then_usage():
    app, state = bare_app(FakePipeline())
    events = stream_events(TestClient(app), n=2, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    choices = [
        (e["choices"][0]["index"], e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events[:-2]
    ]
    opening = {"role": "assistant", "content": ""}
    assert choices[:2] == [(0, opening, None), (1, opening, None)]
    for i in (0, 1):
        assert [d for j, d, f in choices[2:] if j == i and f is None] == [{"content": "a"}, {"content": " b"}]
        assert [(d, f) for j, d, f in choices if j == i and f is not None] == [({}, "length")]
    assert [f for _, _, f in choices[-2:]] == ["length", "length"]  # the finish reasons come after every text
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert all(e["usage"] is None for e in events[:-2])
    assert state.metrics.tokens.labels("completion")._value.get() == 4


def test_without_include_usage_no_usage_is_sent():
    app, _ = bare_app(FakePipeline())
    events = stream_events(TestClient(app))
    assert all("usage" not in e for e in events[:-1]) and events[-2]["choices"][0]["finish_reason"] == "length"


def test_a_failure_after_the_stream_started_is_an_error_event():
    app, _ = bare_app(FakePipeline(fail=RuntimeError("the worker broke")))
    events = stream_events(TestClient(app))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["error"]["message"] == "the worker broke" and events[2:] == ["[DONE]"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_queue_is_429_and_a_missed_deadline_504(stream):
    app, _ = bare_app(FakePipeline(refuse=QueueFull()))
    r = chat(TestClient(app), 429, stream=stream)
    assert error_of(r, 429)["code"] == "queue_full" and r.headers["retry-after"] == "1"
    app, _ = bare_app(FakePipeline(hang=True), ServeOptions(MODEL, 8, 0.05, 1000, None, 30))
    if stream:  # the 200 is sent: the deadline comes in-stream
        assert stream_events(TestClient(app))[-2:] == [ERROR_504, "[DONE]"]
    else:
        assert error_of(chat(TestClient(app), 504), 504)["code"] == "deadline_exceeded"


class LogprobsPipeline(FakePipeline):
    """Answers "a b" with the log-probs a runner records: each token's, and its alternatives by text."""

    def submit_many(self, reqs) -> None:
        self.seen.extend(reqs)
        lp = TokenLogprobs(["a", " b"], [-0.5, -1.0], [{"a": -0.5, "c": -0.25, "é": -2.0}, {" b": -1.0}], [0, 1])
        for r in reqs:
            r.resolve(Completion("a b", len(r.ids), 2, "length", lp))


def test_logprobs_come_in_the_chat_form():
    app, state = bare_app(LogprobsPipeline())
    choice = chat(TestClient(app), logprobs=True, top_logprobs=2).json()["choices"][0]
    assert state.pipeline.seen[0].params["sampling"].logprobs == 2
    first, second = choice["logprobs"]["content"]
    assert (first["token"], first["logprob"], first["bytes"]) == ("a", -0.5, [97])
    assert first["top_logprobs"] == [  # likeliest first, k of them
        {"token": "c", "logprob": -0.25, "bytes": [99]},
        {"token": "a", "logprob": -0.5, "bytes": [97]},
    ]
    assert second["top_logprobs"] == [{"token": " b", "logprob": -1.0, "bytes": [32, 98]}]
    none = chat(TestClient(app), logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert state.pipeline.seen[-1].params["sampling"].logprobs == 0 and [t["top_logprobs"] for t in none] == [[], []]
    assert chat(TestClient(app)).json()["choices"][0]["logprobs"] is None


class NoTemplateRunner(FakeRunner):
    def chat_ids(self, messages):
        raise NoChatTemplate("no template")


def test_a_model_without_a_chat_template_is_400():
    app, state = bare_app(FakePipeline())
    state.runner = NoTemplateRunner()
    err = error_of(chat(TestClient(app), 400), 400)
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "messages", "chat_template_missing")
    assert "/v1/completions" in err["message"] and not state.pipeline.seen


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [{"role": "user"}]}, "messages", "missing_required_parameter"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "invalid_value"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages",
         "invalid_value"),
        ({"messages": [{"role": "user", "content": "a \ud800"}]}, "messages", "invalid_value"),
        ({"messages": [{"role": "user", "content": "w " * 9}]}, "messages", "context_length_exceeded"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"logprobs": True, "top_logprobs": 6}, "top_logprobs", "invalid_value"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "invalid_value"),
        ({"logprobs": "yes"}, "logprobs", "invalid_type"),
        ({"logprobs": True, "stream": True}, "logprobs", "invalid_value"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
        ({"max_tokens": 513}, "max_tokens", "invalid_value"),
        ({"n": 300}, "n", "invalid_value"),
        ({"model": "gpt-4"}, "model", "model_not_found"),
    ],
    ids=lambda v: json.dumps(v, ensure_ascii=True)[:40] if isinstance(v, dict) else None,
)  # fmt: skip
def test_refusals(fields, param, code):
    app, state = bare_app(FakePipeline())
    payload = json.dumps({"model": MODEL, "messages": CHAT, **fields})  # json.dumps escapes a lone surrogate
    r = TestClient(app).post(URL, content=payload, headers={"content-type": "application/json"})
    err = error_of(r, 404 if code == "model_not_found" else 400)
    assert (err["param"], err["code"]) == (param, code), err
    assert not state.pipeline.seen


def test_the_route_is_documented_and_guarded():
    opts = ServeOptions(MODEL, 8, 1.0, 10_000, api_key="k", body_timeout_s=30)
    metrics = Metrics()
    app = build_app(opts, lambda: (FakeRunner(), FakePipeline(), metrics, {"model": MODEL}))
    with TestClient(app) as c:
        assert error_of(c.post(URL, json={"model": MODEL, "messages": CHAT}), 401)["code"] == "invalid_api_key"
        ok = c.post(URL, json={"model": MODEL, "messages": CHAT}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200, ok.text
        responses = c.get("/openapi.json").json()["paths"][URL]["post"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    assert responses["200"]["content"]["text/event-stream"]["schema"]["title"] == "ChatCompletionChunk"
    assert responses["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert metrics.requests.labels(URL, "401")._value.get() == metrics.requests.labels(URL, "200")._value.get() == 1


# ------------------------------------------------------------------------------ the decoder-only demo model


@pytest.fixture(scope="module")
def olmoe():
    """The official client against `sida serve`'s app on the OLMoE demo model, served by uvicorn on a socket."""
    from openai import OpenAI

    settings = load_settings(model_dir=OLMOE, mode="exact", max_batch_wait_ms=5, torch_threads=1)
    with running(app_from_settings(settings)) as base:
        yield OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def test_openai_client_chat_plain_and_streamed_agree(olmoe):
    messages = [{"role": "system", "content": "you answer briefly ."}, {"role": "user", "content": "where is paris ?"}]
    out = olmoe.chat.completions.create(model="sida-olmoe-demo", messages=messages, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and out.usage.prompt_tokens > 0
    chunks = list(
        olmoe.chat.completions.create(
            model="sida-olmoe-demo",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same answer either way
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_openai_client_chat_logprobs(olmoe):
    out = olmoe.chat.completions.create(
        model="sida-olmoe-demo",
        messages=[{"role": "user", "content": "the city council voted"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = out.choices[0]
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    for t in tokens:  # greedy: the chosen token is the likeliest
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob <= 0
        assert bytes(t.bytes).decode() == t.token


def test_the_shipped_chat_template_is_the_builders():
    """`make demo-olmoe` writes the template the shipped model has; it is not part of the fingerprint."""
    from sida.demo_model.decoder_lm import CHAT_TEMPLATE

    config = json.loads((OLMOE / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    card = json.loads((OLMOE / "card.json").read_text())
    assert card["fingerprint"] == fingerprint(OLMOE)
