import pytest
import torch
from torch import nn

from sida.offload.device_cache import DeviceExpertCache
from sida.offload.expert_execution import ExpertExecutor
from sida.offload.expert_store import ExpertStore
from sida.offload.policies import make_policy
from sida.offload.transfer import Transfer

LAYERS, EXPERTS, HIDDEN = 2, 6, 8
CPU = torch.device("cpu")


def expert_forward(params, x):
    return torch.tanh(nn.functional.linear(x, params["weight"], params["bias"]))  # [n, HIDDEN]


def make_cache(num_slots, tier="ram", path=None):
    torch.manual_seed(0)
    modules = [((la, e), nn.Linear(HIDDEN, HIDDEN)) for la in range(LAYERS) for e in range(EXPERTS)]
    store = ExpertStore.from_experts(iter(modules), tier, disk_path=path)
    transfer = Transfer(CPU, store.layout.numel, store.layout.dtype)
    return DeviceExpertCache(store, num_slots, make_policy("lru"), CPU, transfer)


def store_params(cache, key):
    """An expert's parameters read straight from the host store, not through a slot."""
    return cache.store.layout.views(cache.store.host(key).clone())


def reference(cache, hidden, top_k_index, top_k_weights, layer):
    """A plain loop: every expert id ascending, its (choice, token) pairs in order, from the store's weights."""
    out = torch.zeros_like(hidden)
    for e in range(EXPERTS):
        choice, token = torch.nonzero(top_k_index.T == e, as_tuple=True)
        y = expert_forward(store_params(cache, (layer, e)), hidden[token])
        out.index_add_(0, token, (y * top_k_weights[token, choice, None]).to(out.dtype))
    return out


def routed(tokens=24, k=1, seed=1):
    """hidden [tokens, HIDDEN], top_k_index [tokens, k] (a few -1 and out-of-range ids), weights [tokens, k]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=g)
    index = torch.stack([torch.randperm(EXPERTS, generator=g)[:k] for _ in range(tokens)])  # distinct per token
    index[3] = -1  # a token with no expert at all
    index[5, -1] = EXPERTS  # sentinels past the last expert
    index[9, -1] = EXPERTS + 7
    index[7, 0] = -1
    weights = torch.rand(tokens, k, generator=g)
    return hidden, index, weights


class RecordingCache:
    """A real cache whose calls are recorded, in order, with their arguments."""

    def __init__(self, cache):
        self.cache = cache
        self.calls = []

    def __getattr__(self, name):
        method = getattr(self.cache, name)

        def record(*args, **kwargs):
            self.calls.append((name, *args, *kwargs.values()))
            return method(*args, **kwargs)

        return record


def test_top_1_equals_a_plain_loop_over_the_experts_bit_for_bit():
    cache = make_cache(LAYERS * EXPERTS)
    hidden, index, weights = routed(k=1)
    out = ExpertExecutor(cache, expert_forward, EXPERTS, lambda layer: {})(hidden, index, weights, 1)
    assert torch.equal(out, reference(cache, hidden, index, weights, 1))
    for t in (3, 5, 9):  # no expert, or only a sentinel
        assert torch.equal(out[t], torch.zeros(HIDDEN))


def test_top_2_sums_each_choice_weighted_and_ignores_no_expert_ids():
    cache = make_cache(LAYERS * EXPERTS)
    hidden, index, weights = routed(k=2)
    out = ExpertExecutor(cache, expert_forward, EXPERTS, lambda layer: {})(hidden, index, weights, 0)
    expected = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for c in range(2):
            e = int(index[t, c])
            if 0 <= e < EXPERTS:
                expected[t] += weights[t, c] * expert_forward(store_params(cache, (0, e)), hidden[t : t + 1])[0]
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[3], torch.zeros(HIDDEN))
    assert sorted(cache.resident_keys) == [
        (0, e) for e in sorted(set(index[(index >= 0) & (index < EXPERTS)].tolist()))
    ]


def test_cache_calls_come_in_the_documented_order():
    cache = RecordingCache(make_cache(4))
    hidden = torch.randn(4, HIDDEN)
    index = torch.tensor([[2], [0], [-1], [2]])

    def next_keys(layer):
        cache.calls.append(("next_keys", layer))
        return {(layer + 1, 5): 1.0}

    ExpertExecutor(cache, expert_forward, EXPERTS, next_keys)(hidden, index, torch.ones(4, 1), 0)
    a, b, nxt = (0, 0), (0, 2), (1, 5)
    assert cache.calls == [
        ("cancel_prefetches", 0, [a, b]),
        ("next_keys", 0),
        ("waves", [a, b]),
        ("acquire", [a, b]),
        ("prefetch", [nxt], {a, b}, {nxt: 1.0}),  # what runs next, never over this layer's experts, with its chance
        ("release", [a]),
        ("prefetch", [nxt], {b}, {nxt: 1.0}),  # into the freed slot, keeping the rest of the wave
        ("release", [b]),
        ("prefetch", [nxt], set(), {nxt: 1.0}),
        ("release", []),
    ]
    assert cache.cache.pinned_keys == []


def test_every_acquired_expert_is_released_when_an_expert_forward_raises():
    cache = RecordingCache(make_cache(4))
    calls = []

    def failing(params, x):
        calls.append(1)
        if len(calls) == 2:  # the second expert of the wave: the first is released, the rest still pinned
            raise RuntimeError("injected expert failure")
        return expert_forward(params, x)

    hidden, index, weights = routed(k=1)
    with pytest.raises(RuntimeError, match="injected"):
        ExpertExecutor(cache, failing, EXPERTS, lambda layer: {})(hidden, index, weights, 0)
    acquired = [k for call in cache.calls if call[0] == "acquire" for k in call[1]]
    released = [k for call in cache.calls if call[0] == "release" for k in call[1]]
    assert len(acquired) == 4 and sorted(released) == sorted(acquired)
    assert cache.cache.pinned_keys == []


@pytest.mark.parametrize("k", [1, 2])
def test_a_budget_smaller_than_the_layer_runs_in_waves_with_the_same_result(k):
    cache = make_cache(2)
    recording = RecordingCache(cache)
    hidden, index, weights = routed(k=k, seed=k)
    executor = ExpertExecutor(recording, expert_forward, EXPERTS, lambda layer: {(1, 0): 1.0, (1, 1): 1.0})
    out = executor(hidden, index, weights, 0)
    expected = reference(cache, hidden, index, weights, 0)
    if k == 1:
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected)
    assert [len(call[1]) for call in recording.calls if call[0] == "acquire"] == [2, 2, 2]
    assert cache.stats.waves == 2 and cache.pinned_keys == []
    assert cache.stats.peak_resident <= 2


def fail_reads(cache, key, times):
    """The store's read of `key` (`host` on the ram tier, `read_into` on disk) raises on its first `times` calls."""
    name = "read_into" if cache.store.tier == "disk" else "host"
    real, failed = getattr(cache.store, name), []

    def read(k, *args):
        if k == key and len(failed) < times:
            failed.append(k)
            raise OSError("I/O error")
        return real(k, *args)

    setattr(cache.store, name, read)


def prefetching_layer_1(cache):
    """An executor whose layer 0 prefetches every expert of layer 1 (the budget holds both layers)."""
    layer_1 = [(1, e) for e in range(EXPERTS)]
    return ExpertExecutor(
        cache, expert_forward, EXPERTS, lambda layer: dict.fromkeys(layer_1, 1.0) if layer == 0 else {}
    )


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_a_failed_prefetch_is_read_once_more_on_demand_and_the_batch_is_unchanged(tmp_path, tier):
    cache = make_cache(LAYERS * EXPERTS, tier, tmp_path / "e.safetensors")
    hidden, index, weights = routed(k=1)
    assert (index == 2).any()
    expected = reference(cache, hidden, index, weights, 1)
    fail_reads(cache, (1, 2), times=1)
    executor = prefetching_layer_1(cache)
    executor(hidden, index, weights, 0)  # prefetches layer 1: the read of (1, 2) fails
    assert torch.equal(executor(hidden, index, weights, 1), expected)
    stats = cache.stats
    assert (cache.transfer.failed_reads, stats.load_retries) == (1, 1)
    assert stats.misses_by_layer[1] == 1 and stats.hits_by_layer[1] == EXPERTS - 1  # the failed one is no hit
    assert stats.prefetch_unused_bytes[1] == cache.expert_bytes  # the failed prefetch, never used
    assert cache.pinned_keys == [] and cache.is_resident((1, 2))


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_a_read_that_fails_again_on_demand_fails_the_batch_and_pins_nothing(tmp_path, tier):
    cache = make_cache(LAYERS * EXPERTS, tier, tmp_path / "e.safetensors")
    placed = dict(cache.memory.by_kind)
    hidden, index, weights = routed(k=1)
    fail_reads(cache, (1, 2), times=2)
    executor = prefetching_layer_1(cache)
    executor(hidden, index, weights, 0)
    with pytest.raises(OSError, match="I/O error"):
        executor(hidden, index, weights, 1)
    stats = cache.stats
    assert (cache.transfer.failed_reads, stats.load_retries) == (2, 1)
    assert cache.pinned_keys == [] and not cache.is_resident((1, 2))
    assert len(cache.resident_keys) + len(cache._free) == cache.num_slots and cache.memory.by_kind == placed
