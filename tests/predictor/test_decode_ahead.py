"""The decode-step predictor (predictor/decode_ahead.py): its traces line up with the steps they come from, it saves
and loads bound to its model, and the decoder-only demo ships one that beats the routers applied ahead on held-out
text and is what the server guesses decode steps with."""

from __future__ import annotations

import pytest
import torch

from sida.offload.model_loader import load_model
from sida.predictor.artifact import PredictorError
from sida.predictor.decode_ahead import DecodeAhead, decode_routes, fit, measure
from sida.server.composition import build_runner
from sida.server.settings import load_settings
from tests.conftest import REPO
from tests.offload.tiny_families import make_tiny_causal

OLMOE_DEMO = REPO / "models" / "sida-olmoe-demo"
PROMPTS = ["the city council voted on tuesday", "a gorgeous , witty movie", "it 's", "the lobster is a species of"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_causal("olmoe", tmp_path_factory.mktemp("ahead") / "tiny-olmoe"))


def test_routes_line_up_with_the_decode_steps(tiny):
    routes = decode_routes(tiny, PROMPTS, tokens=5, batch=3)
    steps = len(PROMPTS) * 4  # every prompt's 4 decode steps after its first token
    assert routes.tokens.shape == (steps, 2)
    assert all(routes.hidden[la].shape[0] == steps and routes.experts[la].shape == (steps, 2) for la in (0, 1))
    first_steps = (routes.last_before.abs().sum(-1) == 0).sum()
    assert first_steps == len(PROMPTS)  # a sequence's first decode step has no step before it
    ids = tiny.tokenizer(PROMPTS[0])["input_ids"]
    assert routes.tokens[0, 0] == ids[-1] or routes.tokens[0, 0] == ids[-2]  # the prompt's last token comes before


def test_it_saves_and_loads_bound_to_its_model(tiny, tmp_path):
    routes = decode_routes(tiny, PROMPTS, tokens=5)
    net = fit(tiny, routes, epochs=20)
    net.save(tmp_path, tiny.fingerprint, {"note": "test"})
    back = DecodeAhead.load(tmp_path, tiny.fingerprint)
    x, emb = routes.hidden[0][:3], torch.randn(3, 2 * net.hidden_size)
    assert torch.equal(back(1, x, emb), net(1, x, emb))
    assert set(measure(tiny, back, routes)) >= {"router_ahead", "trained", "trained.0", "router_ahead.1"}
    with pytest.raises(PredictorError, match="built for model"):
        DecodeAhead.load(tmp_path, "another-model")
    assert DecodeAhead.load(tmp_path / "missing", tiny.fingerprint) is None


def test_the_demo_ships_one_that_beats_the_routers_ahead_on_held_out_text():
    recall = DecodeAhead.report(OLMOE_DEMO / "predictor")["heldout_recall"]
    assert recall["trained"] >= 0.9 and recall["trained"] > recall["router_ahead"], recall
    runner = build_runner(load_settings(model_dir=OLMOE_DEMO, mode="exact", budget_experts=16))
    assert isinstance(runner.engine.context.lookahead.scorer, DecodeAhead)
