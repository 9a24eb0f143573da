"""Continuous batching (offload/decode_batch.py, offload/kv_cache.py): sequences that join a running decode batch at
different steps and leave as they end generate what they generate alone; the KV bound holds; the transformers cache
internals the joins rely on are where they were."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sida.offload import kv_cache
from sida.offload.decode_batch import DecodeBatch, Sequence
from sida.offload.engine import OffloadConfig, OffloadEngine
from sida.offload.model_loader import load_model
from sida.offload.runner import Runner
from sida.offload.sampling import Sampling
from tests.conftest import DATA, REPO
from tests.offload.tiny_families import FAMILIES, make_tiny_causal

OLMOE_DEMO = REPO / "models" / "sida-olmoe-demo"


def sst2_sentences(n: int) -> list[str]:
    rows = (DATA / "sst2" / "test.tsv").read_text().splitlines()[1 : n + 1]
    return [r.split("\t")[1] for r in rows]


@pytest.fixture(scope="module")
def runner():
    loaded = load_model(OLMOE_DEMO, experts="host")
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=16), torch.device("cpu"))
    return Runner(loaded, engine=engine)


def run_in_waves(batch: DecodeBatch, seqs: list[Sequence], per_wave: int) -> int:
    """Admit `per_wave` sequences before each decode step until all have ended; returns the steps run."""
    pending = list(seqs)
    while pending or batch.running:
        wave, pending = pending[:per_wave], pending[per_wave:]
        if wave:
            batch.admit(wave, batch.runner.pad([s.ids for s in wave]))
        batch.step()
    return batch.steps


def test_the_cache_internals_joins_rely_on_are_there():
    cache = DynamicCache()
    k = torch.randn(2, 3, 4, 5)
    cache.update(k, k.clone(), 0)
    layer = cache.layers[0]
    assert isinstance(layer, DynamicLayer) and layer.is_initialized
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, k)
    assert cache.get_seq_length() == 4  # what the next forward takes for the cache's width


def test_join_left_pads_and_keep_drops_rows_and_columns():
    a, b = DynamicCache(), DynamicCache()
    ka, kb = torch.ones(1, 2, 3, 4), torch.full((2, 2, 5, 4), 2.0)
    a.update(ka, ka.clone(), 0)
    b.update(kb, kb.clone(), 0)
    joined = kv_cache.join(a, b)
    assert joined.layers[0].keys.shape[-2] == 5 and joined.layers[0].keys.shape[0] == 3
    assert joined.layers[0].keys[0, :, :2].abs().sum() == 0  # the shorter row's padding comes first
    assert kv_cache.nbytes(joined) == 2 * 3 * 2 * 5 * 4 * 4
    kept = kv_cache.keep(joined, [0], drop_columns=2)
    assert torch.equal(kept.layers[0].keys, ka)


def test_sequences_joining_at_different_steps_generate_what_they_generate_alone(runner):
    prompts = sst2_sentences(12)
    alone = [runner.complete([p], max_new_tokens=20)[0] for p in prompts]
    batch = DecodeBatch(runner)
    seqs = [Sequence(ids, 20) for ids in runner.tokenize(prompts)]
    steps = run_in_waves(batch, seqs, per_wave=3)
    assert [s.result.text for s in seqs] == [a.text for a in alone]
    assert [s.result.completion_tokens for s in seqs] == [a.completion_tokens for a in alone]
    assert [s.result.finish_reason for s in seqs] == [a.finish_reason for a in alone]
    assert steps < sum(len(s.generated) for s in seqs)  # the rows shared steps
    assert batch.running == [] and batch.cache is None
    assert runner.engine.cache.stats.loads > 0  # the experts came through the budgeted cache


def test_sampling_penalties_logprobs_and_stops_match_a_lone_run(runner):
    prompts = sst2_sentences(4)
    s = Sampling(temperature=0.8, top_p=0.9, frequency_penalty=0.5, repetition_penalty=1.2, logprobs=2)
    alone = [runner.complete([p], 16, sampling=s, seed=7 + i, stops=["."])[0] for i, p in enumerate(prompts)]
    batch = DecodeBatch(runner)
    ids = runner.tokenize(prompts)
    seqs = [Sequence(x, 16, s, seed=7 + i, stops=["."]) for i, x in enumerate(ids)]
    run_in_waves(batch, seqs, per_wave=2)
    for a, q in zip(alone, seqs):
        assert q.result.text == a.text and q.result.finish_reason == a.finish_reason
        assert q.result.logprobs.tokens == a.logprobs.tokens
        assert q.result.logprobs.token_logprobs == pytest.approx(a.logprobs.token_logprobs, abs=1e-4)


def test_ignore_eos_generates_max_tokens_and_text_streams(runner):
    deltas = []
    seq = Sequence(runner.tokenize(["the movie was"])[0], 30, ignore_eos=True, on_text=deltas.append)
    batch = DecodeBatch(runner)
    run_in_waves(batch, [seq], 1)
    assert seq.result.completion_tokens == 30 and seq.result.finish_reason == "length"
    assert "".join(deltas) == seq.result.text
    assert seq.result.first_token_at <= seq.result.ended_at


def test_admission_keeps_the_kv_bound(runner):
    batch = DecodeBatch(runner)
    seqs = [Sequence(ids, 24, ignore_eos=True) for ids in runner.tokenize(sst2_sentences(6))]
    batch.bind(2 * max(s.worst_tokens for s in seqs) * batch.kv_per_token)
    peak, pending = 0, list(seqs)
    while pending or batch.running:
        n = batch.room_for(pending)
        if n:
            batch.admit(pending[:n], runner.pad([s.ids for s in pending[:n]]))
            pending = pending[n:]
        peak = max(peak, len(batch.running))
        assert batch.kv_bytes <= batch.kv_reserved <= batch.kv_bound
        batch.step()
    assert peak == 2 and all(s.result.completion_tokens == 24 for s in seqs)
    assert runner.engine.memory.by_kind["kv_cache"] >= batch.kv_bound
    huge = Sequence(list(range(5000)), 10)
    assert not batch.fits_alone(huge)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_decodes_continuously_or_says_why_not(family, tmp_path):
    path = make_tiny_causal(family, tmp_path / family)
    loaded = load_model(path, experts="host")
    reason = kv_cache.unsupported(loaded.model.config)
    if family == "gpt_oss":  # sliding-window layers: its cache keeps only the last tokens
        assert reason is not None and "Sliding" in reason
        return
    assert reason is None
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=2), torch.device("cpu"))
    runner = Runner(loaded, engine=engine)
    prompts = ["the city council voted on tuesday", "a gorgeous , witty movie", "it 's"]
    alone = [runner.complete([p], max_new_tokens=6)[0].text for p in prompts]
    seqs = [Sequence(ids, 6) for ids in runner.tokenize(prompts)]
    run_in_waves(DecodeBatch(runner), seqs, per_wave=1)
    assert [s.result.text for s in seqs] == alone
