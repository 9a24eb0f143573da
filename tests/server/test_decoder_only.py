"""A decoder-only MoE model served like the Switch demo: the runner's classify and complete under offload agree with
the resident model, and the app answers /v1/completions, /v1/classify, /v1/models and /info with its family."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from fastapi.testclient import TestClient

from sida.offload.engine import OffloadConfig, OffloadEngine
from sida.offload.model_loader import load_model
from sida.offload.runner import Runner
from sida.server.app import app_from_settings
from sida.server.settings import load_settings
from tests.conftest import DEMO, REPO
from tests.offload.tiny_families import make_tiny_causal

PROMPTS = ["the city council voted on tuesday", "a gorgeous , witty movie", "it 's"]


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    return make_tiny_causal("olmoe", tmp_path_factory.mktemp("olmoe") / "tiny-olmoe")


def offloaded_runner(model_dir, mode="exact", tier="ram", tmp=None):
    loaded = load_model(model_dir, experts="host")
    cfg = OffloadConfig(mode=mode, budget_experts=2, tier=tier, expert_dir=tmp)
    return Runner(loaded, engine=OffloadEngine(loaded, cfg, torch.device("cpu")))


def test_prompts_are_left_padded_without_a_trailing_eos(olmoe_dir):
    runner = Runner(load_model(olmoe_dir))
    enc = runner.encode(PROMPTS)
    eos = runner.model.config.eos_token_id
    assert (enc["input_ids"][:, -1] != eos).all() and enc["attention_mask"][:, -1].all()
    assert enc["attention_mask"][2, 0] == 0  # the short prompt's padding comes first


def test_offloaded_classify_and_complete_agree_with_the_resident_model(olmoe_dir, tmp_path):
    resident = Runner(load_model(olmoe_dir))
    for tier in ("ram", "disk"):
        runner = offloaded_runner(olmoe_dir, tier=tier, tmp=tmp_path)
        got, want = runner.classify(PROMPTS), resident.classify(PROMPTS)
        assert [c.label for c in got] == [c.label for c in want]
        for g, w in zip(got, want):
            assert all(abs(g.probs[k] - w.probs[k]) < 1e-5 for k in w.probs)
        got, want = runner.complete(PROMPTS, max_new_tokens=8), resident.complete(PROMPTS, max_new_tokens=8)
        assert [c.text for c in got] == [c.text for c in want]
        assert [c.completion_tokens for c in got] == [c.completion_tokens for c in want]
        assert got[0].prompt_tokens == len(runner.tokenize(PROMPTS[:1])[0])
        assert runner.engine.cache.stats.evictions > 0


def test_the_app_serves_a_decoder_only_family(olmoe_dir):
    settings = load_settings(model_dir=olmoe_dir, mode="exact", budget_experts=2, max_batch_wait_ms=5, torch_threads=1)
    with TestClient(app_from_settings(settings, "none")) as client:
        body = {"model": "tiny-olmoe", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        expected = Runner(load_model(olmoe_dir)).complete(PROMPTS[:1], max_new_tokens=6)[0]
        assert r.json()["choices"][0]["text"] == expected.text
        r = client.post("/v1/classify", json={"model": "tiny-olmoe", "input": ["a fine movie ."]})
        assert r.status_code == 200 and r.json()["data"][0]["label"] in ("positive", "negative")
        models = client.get("/v1/models").json()["data"]
        assert models[0]["id"] == "tiny-olmoe" and models[0]["family"] == "olmoe"
        info = client.get("/info").json()
        assert info["family"] == "olmoe" and info["offload"]["budget_experts"] == 2


def test_an_unsupported_model_type_is_one_line_and_exit_2(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=300)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((DEMO / name).read_bytes())
    cmd = [sys.executable, "-m", "sida.server.cli", "classify", "--model", str(tmp_path), "--mode", "exact", "x"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "no MoE layers" in r.stderr, r.stderr
