"""The offload engine on tiny random Switch models: exact equals Hugging Face, the table really routes."""

import pytest
import torch

from sida.offload.calibration import PRIOR
from sida.offload.engine import OffloadConfig, OffloadEngine
from sida.offload.hash_table import HashTable
from sida.offload.model_loader import load_model
from sida.offload.runner import Runner
from sida.predictor.oracle import OracleHash
from tests.conftest import TINY_TEXTS

CPU = torch.device("cpu")
PROMPTS = list(dict.fromkeys(TINY_TEXTS)) + ["sst2 sentence: short", "the cat sat on the mat and the dog sat too ."]


def forward(loaded, engine=None, hash_fn=None, decoder_len=3):
    runner = Runner(loaded, engine=engine, hash_fn=hash_fn)
    enc = runner.encode(PROMPTS)
    dec = torch.zeros((len(PROMPTS), decoder_len), dtype=torch.long)
    dec[:, 1:] = enc["input_ids"][:, : decoder_len - 1]
    runner.begin_batch(enc, dec, runner.build_hash_table(enc, dec))
    with torch.inference_mode():
        return loaded.model(**enc, decoder_input_ids=dec).logits


def run(model_dir, hash_k=3, table=None, **cfg):
    loaded = load_model(model_dir)
    engine = OffloadEngine(loaded, OffloadConfig(**cfg), CPU)
    hash_fn = (
        OracleHash(load_model(model_dir), k=hash_k) if cfg.get("mode") == "predicted" or table == "oracle" else None
    )
    return forward(loaded, engine, hash_fn), engine


@pytest.fixture(scope="module")
def reference(tiny8_dir):
    return forward(load_model(tiny8_dir))


@pytest.mark.parametrize("budget", [1, 3, 8, 4, 16])  # 1, 3, one layer's worth, 25% and 100% of 16
@pytest.mark.parametrize("policy", ["fifo", "lru", "lfu"])
def test_exact_equals_huggingface(tiny8_dir, reference, budget, policy):
    logits, engine = run(tiny8_dir, mode="exact", budget_experts=budget, policy=policy)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    s = engine.cache.stats
    assert s.peak_resident <= budget and len(engine.cache.resident_keys) <= budget
    if budget == 1:
        assert s.waves > 0  # a layer's working set was larger than the budget


def test_exact_disk_tier_and_prefetch(tiny8_dir, reference, tmp_path):
    logits, engine = run(
        tiny8_dir, mode="exact", budget_experts=8, tier="disk", expert_dir=tmp_path, prefetch_k=2, table="oracle"
    )
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert list(tmp_path.glob("*.safetensors"))
    summary = engine.summary()
    assert summary["prefetch_loads"] > 0 and summary["hash_hit_rate"]["top1"] == 1.0


def test_capacity_drops_really_happen(tiny8_dir):
    """The fixture's capacity (3 per sequence) must bind, or the equality above proves nothing about it."""
    loaded = load_model(tiny8_dir)
    layer = loaded.adapter.moe_layers(loaded.model)[0]
    enc = Runner(loaded).encode(PROMPTS)
    seen = {}

    def hook(_module, _inputs, outputs):
        seen["one_hot"] = outputs[0]

    layer.router.register_forward_hook(hook)
    with torch.inference_mode():
        loaded.model(**enc, decoder_input_ids=torch.zeros((len(PROMPTS), 1), dtype=torch.long))
    routed = seen["one_hot"].sum(-1)[enc["attention_mask"].bool()]
    assert (routed == 0).any()


def test_predicted_with_perfect_table_equals_exact(tiny8_dir, reference):
    logits, engine = run(tiny8_dir, mode="predicted", budget_experts=4)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert engine.summary()["router_fallbacks"] == 0


def test_predicted_routes_by_the_table(tiny8_dir, reference):
    loaded = load_model(tiny8_dir)
    engine = OffloadEngine(loaded, OffloadConfig(mode="predicted", budget_experts=4), CPU)
    oracle = OracleHash(load_model(tiny8_dir))

    def corrupted(*args):
        table = oracle(*args)
        return HashTable({k: (v + 1) % 8 for k, v in table.experts.items()}, table.alphas)

    logits = forward(loaded, engine, corrupted)
    assert not torch.allclose(logits, reference, atol=1e-3)


def test_predicted_without_table_is_an_error(tiny8_dir):
    loaded = load_model(tiny8_dir)
    engine = OffloadEngine(loaded, OffloadConfig(mode="predicted"), CPU)
    with pytest.raises(ValueError, match="needs a hash table"):
        forward(loaded, engine)


def test_generation_in_exact_mode_equals_huggingface(tiny8_dir):
    prompts = PROMPTS[:3]
    plain = Runner(load_model(tiny8_dir)).complete(prompts, max_new_tokens=6)
    loaded = load_model(tiny8_dir)
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=2), CPU)
    assert Runner(loaded, engine=engine).complete(prompts, max_new_tokens=6) == plain


def test_experts_leave_the_model(tiny8_dir):
    loaded = load_model(tiny8_dir)
    before = sum(p.numel() for p in loaded.model.parameters())
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=2), CPU)
    after = sum(p.numel() for p in loaded.model.parameters())
    assert before - after == engine.total_experts * engine.cache.store.layout.numel


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(mode="exact", budget_experts=0), "at least 1 expert"),
        (dict(mode="exact", budget_bytes=100), "below one expert"),
        (dict(mode="exact", policy="mru"), "unknown eviction policy 'mru'"),
        (dict(mode="exact", tier="tape"), "unknown expert tier"),
        (dict(mode="turbo"), "unknown mode 'turbo'"),
        (dict(mode="exact", budget_experts=2, budget_bytes=10**9), "not both"),
    ],
)
def test_bad_configuration(tiny_dir, cfg, message):
    with pytest.raises(ValueError, match=message):
        OffloadEngine(load_model(tiny_dir), OffloadConfig(**cfg), CPU)


def test_freed_slots_take_the_next_layers_experts_while_the_layer_computes(tiny8_dir, reference):
    """A budget of one layer's worth: with a perfect table, slots freed as each expert finishes are refilled with the
    next layer's experts, so only the first layer ever waits (its experts have nowhere to go ahead of it)."""
    logits, engine = run(tiny8_dir, mode="exact", budget_experts=8, table="oracle", prefetch_k=1)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    s = engine.cache.stats
    later = [la for la in engine.layer_stack if la > 0]
    assert s.prefetch_loads > 0 and sum(s.misses_by_layer[la] for la in later) == 0


def test_a_budget_holding_every_expert_needs_no_hash_table(tiny8_dir):
    loaded = load_model(tiny8_dir)
    full = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=16), CPU)
    calls = []
    runner = Runner(loaded, engine=full, hash_fn=lambda *a: calls.append(1))
    enc = runner.encode(PROMPTS)
    assert not full.wants_hash_table and runner.build_hash_table(enc, enc["input_ids"][:, :1]) is None and not calls
    assert OffloadEngine(load_model(tiny8_dir), OffloadConfig(mode="exact", budget_experts=15), CPU).wants_hash_table
    assert OffloadEngine(
        load_model(tiny8_dir), OffloadConfig(mode="predicted", budget_experts=16), CPU
    ).wants_hash_table


def _decoder_guess(model_dir, decoder_len=3):
    from sida.predictor.decoder_guess import DecoderGuess, PrevTokenTable, decoder_routes

    loaded = load_model(model_dir)
    enc = Runner(loaded).encode(PROMPTS)
    dec = torch.zeros((len(PROMPTS), decoder_len), dtype=torch.long)
    dec[:, 1:] = enc["input_ids"][:, : decoder_len - 1]
    batch = (enc["input_ids"], enc["attention_mask"], dec, torch.ones_like(dec))
    table = PrevTokenTable(loaded.config.vocab_size, 8).fit(decoder_routes(loaded, [batch]))
    return DecoderGuess.from_table(table)


def test_decoder_guesses_prefetch_decoder_experts_and_are_scored(tiny8_dir, reference):
    def decoder_misses(guess):
        loaded = load_model(tiny8_dir)
        engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=4, prefetch_k=3), CPU)
        if guess is not None:
            engine.set_decoder_guess(guess)
        logits = forward(loaded, engine)
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)  # guesses never change the output
        return sum(engine.cache.stats.misses_by_layer[la] for la in engine.decoder_layers), engine.summary()

    without, summary = decoder_misses(None)
    assert "decoder_hash_hit_rate" not in summary
    with_guess, summary = decoder_misses(_decoder_guess(tiny8_dir))
    assert with_guess < without
    assert 0 < summary["decoder_hash_hit_rate"]["top1"] <= summary["decoder_hash_hit_rate"]["top3"] <= 1
    assert "hash_hit_rate" not in summary  # no encoder table was given: encoder figures are not mixed in


def test_decoder_guesses_during_generation_keep_the_output(tiny8_dir):
    prompts = PROMPTS[:3]
    plain = Runner(load_model(tiny8_dir)).complete(prompts, max_new_tokens=6)
    loaded = load_model(tiny8_dir)
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=2, prefetch_k=2), CPU)
    engine.set_decoder_guess(_decoder_guess(tiny8_dir))
    assert Runner(loaded, engine=engine).complete(prompts, max_new_tokens=6) == plain
    assert engine.routing_stats.hash_lookups  # every generated step was guessed and scored


def test_exact_calibrates_each_layers_guesses_against_the_router_and_expects_the_pass(tiny8_dir, reference):
    logits, engine = run(tiny8_dir, mode="exact", budget_experts=4, policy="layered", table="oracle", prefetch_k=3)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    ctx = engine.context
    table_layers = {la for kind, la in ctx.calibration if kind == "table"}
    assert table_layers == set(engine.layer_stack)  # the oracle's table covers encoder and decoder layers
    cal = ctx.calibration[("table", 0)]
    counted, rate = cal.seen - PRIOR, cal.hits / cal.seen  # [ranks, tenths]
    assert (counted[0] >= 10).any() and (counted[1] >= 10).any()
    # the router's own top-1 is always its choice, its second never: the counts outweigh the prior
    assert (rate[0][counted[0] >= 10] > 0.7).all() and (rate[1][counted[1] >= 10] < 0.3).all()
    # this pass's expectations: each layer's experts' chance of use, handed to the policy as its predicted future
    used = {e for e, p in ctx.expected[0].items() if p > 0.5}
    assert used and all(0.0 <= p <= 1.0 for by in ctx.expected.values() for p in by.values())
    assert engine.cache.policy._chance == {(la, e): p for la, by in ctx.expected.items() for e, p in by.items()}


def test_in_predicted_mode_the_tables_routed_experts_are_certain_and_the_others_unused(tiny8_dir):
    _, engine = run(tiny8_dir, mode="predicted", budget_experts=4, policy="layered", prefetch_k=3)
    assert not engine.context.calibration  # nothing to calibrate: the table routes
    for by_expert in engine.context.expected.values():
        chances = sorted(by_expert.values())
        assert all(p < 1e-9 or p > 1 - 1e-9 for p in chances) and chances[-1] > 1 - 1e-9


def test_a_read_limit_paces_the_disk_tiers_reads(tiny8_dir, reference, tmp_path):
    logits, engine = run(
        tiny8_dir, mode="exact", budget_experts=4, tier="disk", expert_dir=tmp_path, read_limit_bytes_per_s=5e8
    )
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert engine.cache.store.read_limit.bytes_per_s == 5e8
    with pytest.raises(ValueError, match="positive"):
        OffloadEngine(load_model(tiny8_dir), OffloadConfig(mode="exact", read_limit_bytes_per_s=0), CPU)
