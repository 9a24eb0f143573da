import random

import pytest
import torch
from torch import nn

from sida.offload.checkpoint import read_header
from sida.offload.device_cache import DeviceExpertCache
from sida.offload.expert_file import ALIGN
from sida.offload.expert_store import ExpertStore
from sida.offload.policies import make_policy
from sida.offload.transfer import Transfer


def make_store(layers=2, experts=4, tier="ram", path=None):
    torch.manual_seed(0)
    modules = [((la, e), nn.Linear(3, 2, bias=True)) for la in range(layers) for e in range(experts)]
    return ExpertStore.from_experts(iter(modules), tier, disk_path=path), dict(modules)


def make_cache(num_slots, policy="lru", **kw):
    store, modules = make_store(**kw)
    cpu = torch.device("cpu")
    return DeviceExpertCache(
        store, num_slots, make_policy(policy), cpu, Transfer(cpu, store.layout.numel, torch.float32)
    ), modules


def test_acquire_returns_the_experts_weights():
    cache, modules = make_cache(3)
    views = cache.acquire([(1, 2)])
    torch.testing.assert_close(views[(1, 2)]["weight"], modules[(1, 2)].weight)
    torch.testing.assert_close(views[(1, 2)]["bias"], modules[(1, 2)].bias)


@pytest.mark.parametrize("policy", ["fifo", "lru", "lfu"])
@pytest.mark.parametrize("num_slots", [1, 2, 5, 8])
def test_budget_never_exceeded_and_accounting_adds_up(policy, num_slots):
    cache, modules = make_cache(num_slots, policy)
    rng = random.Random(num_slots)
    keys = list(modules)
    for _ in range(200):
        if rng.random() < 0.3:
            cache.prefetch(rng.sample(keys, rng.randint(1, 4)))
        want = rng.sample(keys, rng.randint(1, min(4, num_slots)))
        for wave in cache.waves(want):
            views = cache.acquire(wave)
            for k in wave:  # the slot really holds that expert
                torch.testing.assert_close(views[k]["weight"], modules[k].weight)
            cache.release(wave)
        assert len(cache.resident_keys) <= num_slots
    s = cache.stats
    assert s.peak_resident <= num_slots
    assert s.hits + s.on_demand_loads == s.lookups
    assert s.bytes_moved == s.loads * cache.store.expert_bytes
    assert s.loads - s.evictions == len(cache.resident_keys)


def test_pinned_experts_are_not_evicted():
    cache, _ = make_cache(2)
    cache.acquire([(0, 0)])
    cache.acquire([(0, 1)])
    with pytest.raises(RuntimeError, match="every slot is pinned"):
        cache.waves([(1, 0)])
    cache.release([(0, 0)])
    cache.acquire([(1, 0)])
    assert cache.is_resident((0, 1)) and not cache.is_resident((0, 0))


def test_waves_split_a_working_set_larger_than_the_budget():
    cache, _ = make_cache(2)
    cache.acquire([(0, 3)])
    cache.release([(0, 3)])
    waves = cache.waves([(0, 0), (0, 1), (0, 2), (0, 3)])
    assert [len(w) for w in waves] == [2, 2]
    assert waves[0][0] == (0, 3)  # the resident one goes first
    assert cache.stats.waves == 1
    with pytest.raises(ValueError, match="cannot be pinned at once"):
        cache.acquire([(0, 0), (0, 1), (0, 2)])


def test_hits_and_misses():
    cache, _ = make_cache(4)
    cache.prefetch([(0, 0), (0, 1)])
    cache.acquire([(0, 0), (0, 2)])
    s = cache.stats
    assert (s.lookups, s.hits, s.on_demand_loads, s.prefetch_loads) == (2, 1, 1, 2)
    assert s.hit_rate == 0.5 and s.hits_by_layer[0] == 1 and s.misses_by_layer[0] == 1


def test_prefetch_never_evicts_protected_or_pinned():
    cache, _ = make_cache(2)
    cache.acquire([(0, 0)])
    cache.prefetch([(0, 1)])
    assert cache.prefetch([(1, 0)], protect={(0, 1)}) == 0  # (0,0) pinned, (0,1) protected
    cache.release([(0, 0)])
    assert cache.prefetch([(1, 0)], protect={(0, 1)}) == 1
    assert not cache.is_resident((0, 0)) and cache.is_resident((0, 1))


def test_release_more_than_acquired():
    cache, _ = make_cache(2)
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release([(0, 0)])


def test_zero_capacity():
    with pytest.raises(ValueError, match="at least one expert"):
        make_cache(0)


def test_disk_tier_serves_the_same_weights(tmp_path):
    path = tmp_path / "experts.safetensors"
    cache, modules = make_cache(2, tier="disk", path=path)
    assert path.is_file() and cache.store.tier == "disk"
    for k in [(0, 0), (1, 3), (0, 2)]:
        torch.testing.assert_close(cache.acquire([k])[k]["weight"], modules[k].weight)
        cache.release([k])
    mtime = path.stat().st_mtime_ns
    make_cache(2, tier="disk", path=path)  # written once, then only mapped
    assert path.stat().st_mtime_ns == mtime


def test_ram_arena_in_chunks_of_whole_experts(monkeypatch):
    from sida.offload import expert_store

    store, modules = make_store()
    layout = store.layout
    monkeypatch.setattr(expert_store, "ARENA_CHUNK_BYTES", 3 * layout.nbytes)
    chunked = ExpertStore.from_experts(modules.items())
    assert len(chunked._chunks) == 3  # 8 experts, 3 a chunk
    assert chunked.host_bytes == 8 * layout.nbytes and chunked.pinned_bytes == 0
    for key, module in modules.items():
        torch.testing.assert_close(layout.views(chunked.host(key))["weight"], module.weight)


def test_disk_tier_file_written_by_streaming_is_valid_safetensors(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "experts.safetensors"
    store, modules = make_store(tier="disk", path=path)
    on_disk = {k: v for k, v in load_file(path).items() if not k.startswith("__pad_")}  # pads align experts
    assert len(on_disk) == len(modules)
    for (layer, e), module in modules.items():
        torch.testing.assert_close(store.layout.views(on_disk[f"layer{layer}.expert{e}"])["bias"], module.bias)
    assert store.host_bytes == 0  # the store holds no expert: loads read straight into the slots
    tensors, _ = read_header(path)
    assert all(t.offset % ALIGN == 0 for name, t in tensors.items() if not name.startswith("__pad_"))


def test_damaged_expert_file_is_rewritten(tmp_path):
    path = tmp_path / "experts.safetensors"
    make_store(tier="disk", path=path)
    path.write_bytes(path.read_bytes()[:-8])
    store, modules = make_store(tier="disk", path=path)  # a damaged file is written anew
    assert path.stat().st_size % ALIGN == 0
    views = store.layout.views(store.host((1, 3)))
    torch.testing.assert_close(views["weight"], modules[(1, 3)].weight)


def test_a_failed_read_leaves_the_slot_usable_and_nothing_pinned():
    cache, modules = make_cache(2)
    real = cache.store.host
    cache.store.host = lambda key: (_ for _ in ()).throw(OSError("disk gone")) if key == (1, 1) else real(key)
    with pytest.raises(OSError):
        cache.acquire([(0, 0), (1, 1)])
    assert cache.pinned_keys == []
    cache.store.host = real
    views = cache.acquire([(0, 1), (1, 1)])  # both slots still usable
    torch.testing.assert_close(views[(1, 1)]["weight"], modules[(1, 1)].weight)


def test_a_prefetch_is_made_only_where_its_chance_pays_for_it():
    cache, _ = make_cache(3, policy="layered")
    chance = {(1, 0): 0.5, (1, 1): 0.6, (1, 2): 0.9, (1, 3): 0.65}
    # free slots: a guess at even odds saves a read's wait as often as it wastes a read; better odds pay
    assert cache.prefetch(list(chance), chance=chance) == 3
    assert set(cache.resident_keys) == {(1, 1), (1, 2), (1, 3)}
    # over a victim that may be read again, a guess needs better than two-to-one odds
    assert cache.prefetch([(1, 0)], chance={(1, 0): 0.66}) == 0
    cache.policy.may_replace = lambda victim, key: False  # and a victim the policy lets it replace
    assert cache.prefetch([(1, 0)], chance={(1, 0): 0.9}) == 0
    del cache.policy.may_replace
    assert cache.prefetch([(1, 0)], chance={(1, 0): 0.9}) == 0  # the layered policy: all needed this pass
    cache.policy.expect({(1, 1): 0.1, (1, 2): 0.9, (1, 3): 0.9})  # a new pass that will not use (1, 1)
    assert cache.prefetch([(1, 0)], chance={(1, 0): 0.9}) == 1
    assert not cache.is_resident((1, 1))
    assert cache.stats.prefetch_loads == 4 and cache.stats.evictions == 1
    assert cache.prefetch([(0, 0)]) == 1  # no chance given: certain, subject to the policy alone


def test_a_prefetch_waits_behind_the_needed_reads_and_is_promoted_when_needed(tmp_path):
    import threading

    cache, _ = make_cache(4, tier="disk", path=tmp_path / "experts.safetensors")
    gate = threading.Event()
    order = []
    read = cache.store.read_into
    cache.store.read_into = lambda key, buf: (order.append(key), read(key, buf))
    cache.transfer.start_io(cache.store.read_bytes)
    held = [cache.transfer._pool.submit(gate.wait, 5) for _ in range(2)]  # both reader threads busy
    cache.prefetch([(1, 0), (1, 1)], chance={(1, 0): 0.9, (1, 1): 0.8})
    release = []
    t = threading.Thread(target=lambda: release.append(cache.acquire([(0, 0), (1, 1)])))
    t.start()
    gate.set()
    t.join(5)
    assert [f.result(5) for f in held] == [True, True]
    # the miss and the guess the layer turned out to need go before the other guess
    assert set(order[:2]) == {(0, 0), (1, 1)} and order[2:] in ([], [(1, 0)])
    cache.release([(0, 0), (1, 1)])
    cache.transfer.close()


def test_the_prefetch_bar_rises_with_how_busy_the_link_is():
    from sida.offload.device_cache import prefetch_bar

    assert prefetch_bar(0.5, evicts=False) == pytest.approx(1 / 2)
    assert prefetch_bar(0.5, evicts=True) == pytest.approx(2 / 3)
    assert prefetch_bar(0.0, evicts=True) == 0.0  # an idle link: any guess is worth its read
    assert prefetch_bar(1.0, evicts=False) == 1.0  # a saturated one: none is
    assert prefetch_bar(0.8, evicts=True) == pytest.approx(1.6 / 1.8)


def test_the_recent_share_decays_toward_what_happens_now():
    from sida.offload.io_queue import RecentShare

    now = [0.0]
    share = RecentShare(horizon_s=1.0, clock=lambda: now[0])
    assert share.share == pytest.approx(0.5)  # nothing measured yet
    for _ in range(50):  # waited 90% of every tenth of a second, for five seconds
        now[0] += 0.1
        share.add_span(0.09)
    assert share.share == pytest.approx(0.9, abs=0.01)
    share.add(0.0, 5.0)  # then five idle seconds: the old waits have decayed
    assert share.share < 0.01
