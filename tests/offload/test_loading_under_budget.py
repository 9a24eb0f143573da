"""Loading under the budget: experts go from the checkpoint into the host store and reach the device only through
the slots; every byte placed on the device is accounted; a failed batch leaves the cache as it found it."""

import pytest
import torch

from sida.offload.engine import OffloadConfig, OffloadEngine
from sida.offload.memory import DeviceMemoryError, tensor_bytes
from sida.offload.model_loader import ModelLoadError, load_model
from sida.offload.moe_layer import SiDAMoELayer
from sida.offload.runner import Runner
from sida.server.composition import build_runner
from sida.server.settings import load_settings
from tests.conftest import TINY_TEXTS, make_tiny_switch

CPU = torch.device("cpu")
TEXTS = TINY_TEXTS[:8]


def probs(runner):
    return [c.probs for c in runner.classify(TEXTS)]


def same(got, expected):
    """The same answers: equal labels' probabilities up to float noise (a BLAS call may split its sums
    differently when the machine is busy)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        assert all(abs(g[k] - e[k]) <= 1e-5 for k in g), (g, e)
    return True


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_weights_as_hugging_face_loads_them_and_experts_left_on_meta(tiny8_dir, dtype):
    whole = dict(load_model(tiny8_dir, dtype).model.named_parameters())
    host = load_model(tiny8_dir, dtype, experts="host")
    params = dict(host.model.named_parameters())
    assert params.keys() == whole.keys()
    experts = {n for n, p in params.items() if p.is_meta}
    assert experts and all(".experts." in n for n in experts)
    assert len(experts) == len(host.experts.keys) * len(host.experts.layout.names)
    for name, p in params.items():
        assert p.dtype == whole[name].dtype, name
        if name not in experts:
            assert torch.equal(p, whole[name]), name
    # the tied embeddings share one tensor, as Hugging Face ties them
    model = host.model
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_offloaded_from_the_checkpoint_equals_resident(tiny8_dir, tmp_path, tier):
    expected = probs(Runner(load_model(tiny8_dir)))
    loaded = load_model(tiny8_dir, experts="host")
    cfg = OffloadConfig(mode="exact", budget_experts=3, tier=tier, expert_dir=tmp_path)
    engine = OffloadEngine(loaded, cfg, CPU)
    assert same(probs(Runner(loaded, engine=engine)), expected)
    # no expert tensor is left in the module tree: the SiDA layers hold routers only
    assert not [n for n, _ in loaded.model.named_parameters() if ".experts." in n]
    assert sum(isinstance(m, SiDAMoELayer) for m in loaded.model.modules()) == engine.num_layers


def test_resident_mode_refuses_a_model_loaded_without_experts(tiny_dir):
    with pytest.raises(ValueError, match="experts='device'"):
        OffloadEngine(load_model(tiny_dir, experts="host"), OffloadConfig(mode="resident"), CPU)


def test_truncated_checkpoint_is_one_clear_error(tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated"):
        load_model(d, experts="host")


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A Switch model whose experts outweigh its dense weights many times (as in switch-base)."""
    return make_tiny_switch(tmp_path_factory.mktemp("wide"), num_experts=16, seed=2, d_ff=512)


def test_a_model_whose_experts_exceed_the_device_limit_starts_and_serves_under_it(wide_dir):
    host = load_model(wide_dir, experts="host")
    dense = tensor_bytes([*host.model.parameters(), *host.model.buffers()])
    expert = host.experts.layout.nbytes
    every_expert = expert * len(host.experts.keys)
    assert every_expert > 10 * dense
    limit = dense + 4 * expert + expert // 2  # the dense weights and four slots fit, not five
    base = dict(model_dir=wide_dir, device="cpu", device_memory_limit=limit)

    runner = build_runner(load_settings(**base, mode="exact", budget_experts=4), hash_source="none")
    expected = probs(Runner(load_model(wide_dir)))
    assert same(probs(runner), expected)
    memory = runner.engine.memory
    assert memory.by_kind == {"dense": dense, "experts": 4 * expert}
    assert memory.total <= limit
    assert not [n for n, _ in runner.loaded.model.named_parameters() if ".experts." in n]

    with pytest.raises(DeviceMemoryError, match="over the declared limit"):
        build_runner(load_settings(**base, mode="exact", budget_experts=5), hash_source="none")
    with pytest.raises(DeviceMemoryError, match="over the declared limit"):
        build_runner(load_settings(**base, mode="resident"), hash_source="none")


def test_auto_budget_fills_what_the_declared_limit_leaves(wide_dir, tmp_path):
    host = load_model(wide_dir, experts="host")
    dense = tensor_bytes([*host.model.parameters(), *host.model.buffers()])
    expert = host.experts.layout.nbytes
    limit = dense + 40 * expert  # more than every expert: only the measured activation headroom holds some back
    settings = load_settings(
        model_dir=wide_dir,
        device="cpu",
        mode="exact",
        tier="disk",
        expert_dir=tmp_path,
        budget="auto",
        device_memory_limit=limit,
        max_batch_size=4,
        max_input_tokens=32,
    )
    runner = build_runner(settings, hash_source="none")
    engine = runner.engine
    assert engine.budget.source == "auto" and "activations" in engine.budget.reason
    assert 1 <= engine.num_slots <= 32
    assert engine.memory.total <= limit
    assert same(probs(runner), probs(Runner(load_model(wide_dir))))
    summary = engine.summary()
    assert summary["budget"]["source"] == "auto"
    assert summary["device_memory_bytes"]["experts"] == engine.num_slots * expert


def test_auto_budget_on_cpu_with_the_ram_tier_holds_every_expert(tiny8_dir):
    engine = OffloadEngine(load_model(tiny8_dir, experts="host"), OffloadConfig(mode="exact", budget="auto"), CPU)
    assert engine.num_slots == engine.total_experts


def test_a_failed_batch_leaves_no_expert_pinned(tiny8_dir):
    loaded = load_model(tiny8_dir, experts="host")
    engine = OffloadEngine(loaded, OffloadConfig(mode="exact", budget_experts=16), CPU)  # every expert
    runner = Runner(loaded, engine=engine)
    expected = probs(runner)
    layer = next(m for m in loaded.model.modules() if isinstance(m, SiDAMoELayer))
    forward, calls = layer.executor.expert_forward, []

    def failing(params, x):
        calls.append(1)
        if len(calls) == 2:  # the second expert of the wave: the first is done, the rest still pinned
            raise RuntimeError("injected expert failure")
        return forward(params, x)

    layer.executor.expert_forward = failing  # the executor is shared: every layer fails
    with pytest.raises(RuntimeError, match="injected"):
        probs(runner)
    assert engine.cache.pinned_keys == []
    layer.executor.expert_forward = forward
    assert same(probs(runner), expected)  # the whole budget is usable again: a full-budget wave fits
    assert engine.cache.num_slots == 16 and engine.cache.pinned_keys == []
