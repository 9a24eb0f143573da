"""What OpenAI / vLLM clients send to /v1/completions, on the demo model in-process: penalties, n, logprobs, echo,
user; their refusals in the error envelope; the tasks in /v1/models and /v1/classify for each of them."""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI

from sida.offload.tasks import get_task
from tests.server.test_app import MODEL, make_client

PROMPT = "the city council voted on tuesday to"
PROMPTS = ["the city council voted on tuesday to", "the game was released in japan and"]


@pytest.fixture(scope="module")
def client(demo_dir):
    with make_client() as c:
        yield c


@pytest.fixture(scope="module")
def oai(client):
    """The official client, over the in-process app (TestClient is an httpx.Client)."""
    return OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)


def complete(client, **fields) -> dict:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 24, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def repeats(text: str) -> int:
    """Words of `text` that are a repeat of an earlier one."""
    words = text.split()
    return len(words) - len(set(words))


@pytest.mark.parametrize(
    "penalty",
    [{"repetition_penalty": 1.5}, {"frequency_penalty": 1.5}, {"presence_penalty": 2.0}],
    ids=lambda p: next(iter(p)),
)
def test_penalties_reduce_repeats_on_a_greedy_run(client, penalty):
    plain = complete(client, temperature=0)["choices"][0]["text"]
    penalized = complete(client, temperature=0, **penalty)["choices"][0]["text"]
    assert repeats(penalized) < repeats(plain), (plain, penalized)


def test_neutral_penalties_change_nothing(client):
    plain = complete(client, temperature=0)["choices"][0]["text"]
    neutral = complete(client, temperature=0, repetition_penalty=1, frequency_penalty=0, presence_penalty=0)
    assert neutral["choices"][0]["text"] == plain


def test_n_choices_are_ordered_prompt_major_and_seeded_per_choice(client):
    body = complete(client, prompt=PROMPTS, n=3, temperature=1.0, seed=7, max_tokens=12, echo=True)
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    for c in choices:  # prompt i's choice j is index i * n + j
        assert c["text"].startswith(PROMPTS[c["index"] // 3])
    texts = [c["text"] for c in choices[:3]]
    assert len(set(texts)) == 3, texts  # temperature > 0: each choice draws its own tokens
    again = complete(client, prompt=PROMPTS[0], n=1, temperature=1.0, seed=8, max_tokens=12, echo=True)
    assert again["choices"][0]["text"] == texts[1]  # choice j samples with seed + j
    one = complete(client, prompt=PROMPTS, n=1, max_tokens=12)["usage"]
    assert body["usage"]["prompt_tokens"] == one["prompt_tokens"]  # each prompt counted once


def test_logprobs_of_greedy_tokens(client):
    choice = complete(client, temperature=0, logprobs=3, max_tokens=8)["choices"][0]
    lp = choice["logprobs"]
    n = len(lp["tokens"])
    assert n > 0 and len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert logprob <= 0 and len(top) == 3  # greedy: the chosen token is the likeliest of the three
        assert all(v <= 0 for v in top.values()) and top[token] == logprob == max(top.values())
    zero = complete(client, temperature=0, logprobs=0, max_tokens=4)["choices"][0]["logprobs"]
    assert all(len(top) == 1 for top in zero["top_logprobs"])  # only the sampled token


def test_logprobs_of_sampled_tokens_include_the_sampled_one(client):
    choice = complete(client, temperature=1.5, seed=1, logprobs=1, max_tokens=12)["choices"][0]
    lp = choice["logprobs"]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == logprob and len(top) in (1, 2)


def test_echo_puts_the_prompt_first_with_null_logprobs(client):
    plain = complete(client, temperature=0, max_tokens=8)["choices"][0]["text"]
    choice = complete(client, temperature=0, max_tokens=8, echo=True, logprobs=2)["choices"][0]
    assert choice["text"] == PROMPT + " " + plain  # the continuation starts a new word
    lp = choice["logprobs"]
    prompt_tokens = lp["token_logprobs"].index(next(x for x in lp["token_logprobs"] if x is not None))
    assert (
        "".join(lp["tokens"][:prompt_tokens]) == PROMPT and lp["top_logprobs"][:prompt_tokens] == [None] * prompt_tokens
    )
    assert all(x is not None for x in lp["token_logprobs"][prompt_tokens:])
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        assert choice["text"][offset : offset + len(token)] == token


def test_stream_with_n_and_echo(client):
    payload = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "n": 2, "echo": True}
    with client.stream("POST", "/v1/completions", json={**payload, "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    texts, finished = {}, {}
    for e in (json.loads(line[6:]) for line in lines[:-1]):
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            finished[c["index"]] = c["finish_reason"]
    whole = complete(client, **{k: v for k, v in payload.items() if k != "model"})
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}  # greedy: the same text either way
    assert set(finished) == {0, 1} and all(f in ("stop", "length") for f in finished.values())


def test_user_is_accepted(client):
    assert complete(client, user="user-1234", max_tokens=2)["choices"]


@pytest.mark.parametrize(
    "fields, param, code",
    [
        ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
        ({"presence_penalty": -2.01}, "presence_penalty", "invalid_value"),
        ({"frequency_penalty": 3}, "frequency_penalty", "invalid_value"),
        ({"frequency_penalty": -9}, "frequency_penalty", "invalid_value"),
        ({"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
        ({"repetition_penalty": -1}, "repetition_penalty", "invalid_value"),
        ({"n": 0}, "n", "invalid_value"),
        ({"n": 129}, "n", "invalid_value"),
        ({"logprobs": 6}, "logprobs", "invalid_value"),
        ({"logprobs": -1}, "logprobs", "invalid_value"),
        ({"logprobs": True}, "logprobs", "invalid_type"),
        ({"logprobs": 2, "stream": True}, "logprobs", "invalid_value"),
        ({"echo": "yes please"}, "echo", "invalid_type"),
        ({"user": 42}, "user", "invalid_type"),
    ],
)
def test_out_of_range_values_are_400(client, fields, param, code):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code), err


def test_choices_over_the_queue_bound_are_400(demo_dir):
    with make_client(max_queue=4) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS, "n": 3})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_inputs"


def test_the_openai_client(oai):
    out = oai.completions.create(
        model=MODEL,
        prompt=PROMPTS,
        n=2,
        max_tokens=8,
        temperature=0.7,
        seed=3,
        logprobs=2,
        echo=True,
        frequency_penalty=0.5,
        presence_penalty=0.5,
        user="someone",
        extra_body={"repetition_penalty": 1.2},
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[3].text.startswith(PROMPTS[1])
    assert out.choices[0].logprobs.token_logprobs[0] is None and out.choices[0].logprobs.tokens
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt=PROMPT, presence_penalty=3)


def test_models_list_the_tasks_and_classify_serves_each(client, oai):
    tasks = client.get("/v1/models").json()["data"][0]["tasks"]
    assert tasks == ["mrpc", "multirc", "sst2"]
    assert oai.models.list().data[0].model_dump()["tasks"] == tasks
    for name in tasks:
        task = get_task(name)
        one = [f"text {i} of the input ." for i in range(len(task.fields))]
        body = {"model": MODEL, "task": name, "input": [one if len(one) > 1 else one[0]] * 2}
        r = client.post("/v1/classify", json=body)
        assert r.status_code == 200, r.text
        assert [set(d["probs"]) for d in r.json()["data"]] == [set(task.labels)] * 2
