"""Decode steps guessed a layer ahead (offload/lookahead.py) and the static hot-set baseline (policy `static`): a
guess only prefetches, so tokens stay the router's; recall is counted per layer; the hot set stays resident."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sida.offload.decode_batch import DecodeBatch, Sequence
from sida.offload.engine import OffloadConfig, OffloadEngine
from sida.offload.lookahead import router_projection
from sida.offload.model_loader import load_model
from sida.offload.policies import StaticHotSetPolicy, hot_set
from sida.offload.runner import Runner
from tests.offload.tiny_families import make_tiny_causal

PROMPTS = ["the city council voted on tuesday", "a gorgeous , witty movie", "it 's", "the lobster is a species of"]


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    return make_tiny_causal("olmoe_top4", tmp_path_factory.mktemp("ahead") / "tiny-olmoe")


def offloaded(path, **cfg) -> Runner:
    loaded = load_model(path, experts="host")
    return Runner(loaded, engine=OffloadEngine(loaded, OffloadConfig(mode="exact", **cfg), torch.device("cpu")))


def test_static_hot_set_evicts_cold_keys_first():
    policy = StaticHotSetPolicy(hot={"a", "b"})
    for k in ("a", "b", "c", "d"):
        policy.on_insert(k)
    assert policy.victim(["a", "b", "c", "d"]) == "c"
    assert policy.victim(["a", "b"]) == "a"  # only hot candidates: least recently used
    assert hot_set({"x": 3, "y": 9, "z": 3}, 2) == ["y", "x"]


def test_a_router_without_a_weight_cannot_guess_ahead():
    with pytest.raises(ValueError, match="no \\[experts, hidden\\] weight"):
        router_projection(nn.Identity())


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_decode_steps_are_guessed_a_layer_ahead_and_stay_lossless(olmoe_dir, batching):
    want = [c.text for c in Runner(load_model(olmoe_dir)).complete(PROMPTS, max_new_tokens=8, ignore_eos=True)]
    runner = offloaded(olmoe_dir, budget_experts=3)
    runner.engine.reset_stats()
    if batching == "continuous":
        seqs = [Sequence(ids, 8, ignore_eos=True) for ids in runner.tokenize(PROMPTS)]
        batch = DecodeBatch(runner)
        batch.admit(seqs, runner.pad([s.ids for s in seqs]))
        while batch.running:
            batch.step()
        got = [s.result.text for s in seqs]
    else:
        got = [c.text for c in runner.complete(PROMPTS, max_new_tokens=8, ignore_eos=True)]
    assert got == want  # a guess loads experts; the router still routes
    stats = runner.engine.routing_stats
    layers = runner.engine.num_layers
    assert sorted(stats.decode_lookups) == list(range(layers))  # the first layer from the embeddings, then each
    assert all(stats.decode_lookups[la] == len(PROMPTS) * 7 * 4 for la in range(layers))  # 7 steps × top-4
    recall = runner.engine.summary()["decode_recall"]
    assert 0.0 <= recall["all"] <= 1.0 and set(recall) == {"all", *map(str, range(layers))}
    assert runner.engine.cache.stats.prefetch_loads > 0


def test_keep_hot_loads_the_most_used_experts_and_keeps_them(olmoe_dir):
    runner = offloaded(olmoe_dir, budget_experts=6, policy="static")
    counts = {(la, e): (la + 1) * 10 + e for la in range(2) for e in range(8)}
    hot = runner.engine.keep_hot(counts, on_demand_slots=2)
    assert hot == [(1, 7), (1, 6), (1, 5), (1, 4)]
    runner.complete(PROMPTS, max_new_tokens=6)
    assert set(hot) <= set(runner.engine.cache.resident_keys)
    with pytest.raises(ValueError, match="policy 'static'"):
        offloaded(olmoe_dir, budget_experts=6).engine.keep_hot(counts, 2)
