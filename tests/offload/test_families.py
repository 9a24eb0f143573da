"""Every decoder-only family under offload at a tight budget, on the ram and disk tiers, against Hugging Face's own
all-resident eager run: logits bitwise equal on an unpadded batch (the same kernels on the same rows), greedy
generations equal token for token. With left padding, padding tokens go to no expert, so an expert's matmul sees
fewer rows than Hugging Face's, and BLAS may block the sums differently: real tokens' logits agree to 1e-5 there."""

from __future__ import annotations

import math

import pytest
import torch

from sida.offload.engine import OffloadConfig, OffloadEngine
from sida.offload.hash_table import HashTable
from sida.offload.model_loader import ModelLoadError, load_model
from sida.predictor.oracle import OracleHash
from tests.conftest import DEMO
from tests.offload.tiny_families import FAMILIES, make_tiny_causal

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: make_tiny_causal(f, root / f) for f in FAMILIES}


def hugging_face(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation="eager", local_files_only=True).eval()


def offloaded(model_dir, tier, tmp_path, per_layer=1, mode="exact", dtype="float32"):
    loaded = load_model(model_dir, dtype, experts="host")
    layers = len(loaded.adapter.moe_layers(loaded.model))
    cfg = OffloadConfig(mode=mode, budget_experts=per_layer * layers, tier=tier, expert_dir=tmp_path / "experts")
    return loaded, OffloadEngine(loaded, cfg, CPU)


def batch(padded: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 8000, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # left padding, as generation pads
        mask[0, :3] = 0
        ids[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("tier", ["ram", "disk"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exact_equals_hugging_face_at_one_expert_per_layer(family_dirs, family, tier, tmp_path):
    ref = hugging_face(family_dirs[family])
    loaded, engine = offloaded(family_dirs[family], tier, tmp_path)
    assert engine.num_slots == engine.num_layers < engine.total_experts
    for padded in (False, True):
        ids, mask = batch(padded)
        with torch.inference_mode():
            want = ref(input_ids=ids, attention_mask=mask).logits
            engine.begin_batch(mask)
            got = loaded.model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        if padded:
            torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
        else:
            assert torch.equal(got, want), (got - want).abs().max()
    with torch.inference_mode():
        want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        engine.begin_batch(mask)
        got = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    stats = engine.cache.stats
    assert stats.on_demand_loads > 0 and stats.evictions > 0 and stats.peak_resident <= engine.num_slots


@pytest.mark.parametrize("family", ["gpt_oss", "olmoe", "olmoe_top4"])
def test_bfloat16_checkpoint_kept_in_bfloat16(family, tmp_path):
    model_dir = make_tiny_causal(family, tmp_path / family, dtype=torch.bfloat16)
    ref = hugging_face(model_dir)  # in the checkpoint's dtype (its rotary buffers stay float32)
    assert ref.dtype == torch.bfloat16
    loaded, engine = offloaded(model_dir, "ram", tmp_path, per_layer=2, dtype="bfloat16")
    assert engine.cache.store.layout.dtype == torch.bfloat16
    ids, mask = batch(padded=False)
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask).logits
        engine.begin_batch(mask)  # a first batch leaves experts resident: the next one's waves run those first
        loaded.model(input_ids=ids.flip(0)[:, :5], attention_mask=mask[:, :5])
        engine.begin_batch(mask)
        got = loaded.model(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_experts_never_materialise_in_the_model(family_dirs):
    loaded = load_model(family_dirs["qwen2_moe"], experts="host")
    layers = loaded.adapter.moe_layers(loaded.model)
    experts = layers[0].experts[0].module
    assert experts.gate_up_proj.is_meta and experts.down_proj.is_meta
    assert not any(p.is_meta for n, p in loaded.model.named_parameters() if "mlp.experts." not in n)
    assert not loaded.model.model.layers[0].mlp.shared_expert.gate_proj.weight.is_meta  # a shared expert is dense
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=2), CPU)
    assert not hasattr(experts, "gate_up_proj")  # the slots hold the experts now
    assert engine.memory.by_kind["experts"] == 2 * engine.expert_bytes


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_predicted_with_the_router_as_table_routes_like_the_router(family_dirs, family, tmp_path):
    """A table holding the router's own top-k (softmax probabilities, renormalised as these routers do) routes
    every prompt token as the router does: the logits agree, and every lookup is a hit."""
    ref = hugging_face(family_dirs[family])
    ids, mask = batch(padded=False)
    with torch.inference_mode():
        out = ref(input_ids=ids, attention_mask=mask, output_router_logits=True)
    table = OracleHash(load_model(family_dirs[family]))(ids, mask)  # the routers' logits, captured
    for i, lg in enumerate(out.router_logits):  # what transformers itself reports
        torch.testing.assert_close(table.experts[i][..., :2], lg.view(*ids.shape, -1).topk(2).indices)
    loaded, engine = offloaded(family_dirs[family], "ram", tmp_path, per_layer=2, mode="predicted")
    with torch.inference_mode():
        engine.begin_batch(mask, table)
        got = loaded.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, out.logits, rtol=0, atol=1e-5)
    stats = engine.routing_stats
    assert stats.hash_lookups[0] == ids.numel() and stats.hash_hits[(0, 1)] == ids.numel()


def test_a_wrong_table_changes_the_output_in_predicted_mode_only(family_dirs, tmp_path):
    ids, mask = batch(padded=False)
    wrong = torch.zeros(*ids.shape, 3, dtype=torch.long)
    wrong[..., 1], wrong[..., 2] = 1, 2
    probs = torch.tensor([0.5, 0.3, 0.2]).expand(*ids.shape, 3)
    table = HashTable({0: wrong, 1: wrong}, {0: probs[..., 0], 1: probs[..., 0]}, {0: probs, 1: probs})
    outs = {}
    for mode in ("exact", "predicted"):
        loaded, engine = offloaded(family_dirs["olmoe"], "ram", tmp_path, per_layer=2, mode=mode)
        with torch.inference_mode():
            engine.begin_batch(mask, table)
            outs[mode] = loaded.model(input_ids=ids, attention_mask=mask).logits
    ref = hugging_face(family_dirs["olmoe"])
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(outs["exact"], want)
    assert not torch.allclose(outs["predicted"], want, atol=1e-3)


def test_a_dense_model_is_refused_in_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=300)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "llama" / name).write_bytes((DEMO / name).read_bytes())
    with pytest.raises(ModelLoadError, match="no MoE layers") as err:
        load_model(tmp_path / "llama", experts="host")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])  # fused on disk; per-expert tensors on disk
def test_each_expert_is_read_as_its_own_byte_ranges(family_dirs, family, monkeypatch):
    """Loading under the budget never reads a fused [E, ...] tensor whole: every read of an expert tensor is one
    expert's rows (GPT-OSS stores the fused tensors) or one per-expert tensor (Mixtral's w1/w2/w3)."""
    from sida.offload.checkpoint import Checkpoint

    reads = []  # (tensor name, elements read; None: the whole tensor)
    real_read, real_range = Checkpoint.read, Checkpoint.read_range

    def read(self, name, dtype=None):
        reads.append((name, None))
        return real_read(self, name, dtype)

    def read_range(self, name, start, out):
        reads.append((name, out.numel()))
        return real_range(self, name, start, out)

    monkeypatch.setattr(Checkpoint, "read", read)
    monkeypatch.setattr(Checkpoint, "read_range", read_range)
    loaded = load_model(family_dirs[family], experts="host")
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=2), CPU)
    expert_reads = [(n, size) for n, size in reads if ".experts." in n]
    layout = engine.cache.store.layout
    largest = max(math.prod(s) for s in layout.shapes)
    assert expert_reads and all(size is not None and size <= largest for _, size in expert_reads)
    assert len(expert_reads) >= engine.total_experts * len(layout.names)
