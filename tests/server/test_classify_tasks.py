"""/v1/classify formats every input with the named task's own prompt (not SST-2's whatever the task)."""

import pytest

from sida.offload.runner import Runner
from sida.offload.tasks import get_task
from tests.server.test_app import MODEL, make_client

PAIRS = [
    ["the company said profits rose .", "profits at the company went up , it said ."],
    ["he left on monday .", "the weather was cold all week ."],
]


@pytest.fixture(scope="module")
def client(demo_dir):
    with make_client() as c:
        yield c


@pytest.mark.parametrize(
    ("task", "inputs"),
    [("mrpc", PAIRS), ("sst2", ["a gorgeous , witty movie .", "a dull mess ."])],
)
def test_classify_uses_the_tasks_prompt(client, demo_loaded, task, inputs):
    t = get_task(task)
    texts = [tuple(x) if isinstance(x, list) else (x,) for x in inputs]
    prompts = [t.prompt(*x) for x in texts]
    r = client.post("/v1/classify", json={"model": MODEL, "task": task, "input": inputs})
    assert r.status_code == 200, r.text
    body = r.json()
    runner = Runner(demo_loaded)
    assert [d["label"] for d in body["data"]] == [c.label for c in runner.classify_prompts(prompts, t)]
    assert set(body["data"][0]["probs"]) == set(t.labels)
    assert body["usage"]["prompt_tokens"] == sum(len(x) for x in runner.tokenize(prompts))


def test_one_pair_may_be_given_flat(client):
    r = client.post("/v1/classify", json={"model": MODEL, "task": "mrpc", "input": PAIRS[0]})
    assert r.status_code == 200 and len(r.json()["data"]) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"task": "mrpc", "input": "one sentence only"},
        {"task": "mrpc", "input": [["a", "b", "c"]]},
        {"task": "sst2", "input": [["a", "b"]]},
        {"task": "nope", "input": "x"},
    ],
)
def test_inputs_that_do_not_fit_the_task_are_400(client, body):
    r = client.post("/v1/classify", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("input", "task", None)
