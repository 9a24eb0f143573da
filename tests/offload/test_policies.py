import pytest

from sida.offload.policies import FIFOPolicy, LayeredPolicy, LFUPolicy, LRUPolicy, make_policy


def fill(policy, keys):
    for k in keys:
        policy.on_insert(k)
    return policy


def test_fifo_ignores_use():
    p = fill(FIFOPolicy(), "abc")
    p.on_access("a")
    assert p.victim("abc") == "a"
    p.on_remove("a")
    assert p.victim("bc") == "b"


def test_lru_refreshes_on_use():
    p = fill(LRUPolicy(), "abc")
    p.on_access("a")
    assert p.victim("abc") == "b"
    p.on_access("b")
    assert p.victim("abc") == "c"


def test_lfu_counts_and_breaks_ties_by_recency():
    p = fill(LFUPolicy(), "abc")
    for k in "aab":
        p.on_access(k)
    assert p.victim("abc") == "c"
    p.on_access("c")  # b and c used once each; b was used longer ago
    assert p.victim("abc") == "b"
    p.on_remove("b")
    p.on_insert("b")  # a re-inserted key starts from zero
    assert p.victim("abc") == "b"


def test_layered_evicts_what_a_pass_through_the_layers_needs_last():
    p = fill(LayeredPolicy(), [(layer, e) for layer in range(4) for e in range(2)])
    p.on_access((2, 0))  # the forward pass is at layer 2
    keys = [(layer, e) for layer in range(4) for e in range(2) if (layer, e) != (2, 0)]
    # done this batch (layers 0..2): next needed by the next batch, the latest layer last of all
    assert p.victim(keys) == (2, 1)
    assert p.victim([k for k in keys if k[0] != 2]) == (1, 0)
    # only later layers left: the farthest first
    assert p.victim([(3, 0), (3, 1)]) in {(3, 0), (3, 1)}
    p.on_access((3, 1))
    assert p.victim([(3, 0), (0, 0), (1, 1)]) == (3, 0)  # layer 3 now done too, and the latest


def test_lru_cycling_through_more_than_fits_keeps_nothing_and_layered_keeps_the_early_layers():
    """One expert per layer, 4 layers, 2 slots, the same pass every batch: LRU never hits; layered keeps some."""
    hits = {}
    for cls in (LRUPolicy, LayeredPolicy):
        p, resident, hits[cls.name] = cls(), set(), 0
        for _batch in range(5):
            for layer in range(4):
                key = (layer, 0)
                if key in resident:
                    hits[cls.name] += 1
                else:
                    if len(resident) == 2:
                        victim = p.victim(resident)
                        resident.discard(victim)
                        p.on_remove(victim)
                    resident.add(key)
                    p.on_insert(key)
                p.on_access(key)
    assert hits["lru"] == 0 and hits["layered"] >= 4


@pytest.mark.parametrize("cls", [FIFOPolicy, LRUPolicy, LFUPolicy])  # string keys; layered needs (layer, expert)
def test_victim_only_among_candidates(cls):
    p = fill(cls(), "abcd")
    assert p.victim(["c", "d"]) in ("c", "d")
    with pytest.raises(ValueError):
        p.victim(["z"])


def test_make_policy():
    assert make_policy("fifo").name == "fifo"
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        make_policy("mru")


def layered_at(layer: int, keys, chances=None) -> LayeredPolicy:
    """A layered policy over `keys` (a 6-layer pass), the pass at `layer`, with the predicted `chances` of this pass."""
    p = LayeredPolicy()
    for k in [(5, 0), *keys]:
        p.on_insert(k)
    p.expect(chances or {})
    if layer >= 0:
        p.on_access((layer, 9))
    return p


def test_with_a_prediction_layered_evicts_the_later_expert_this_pass_will_not_use_first():
    keys = [(0, 0), (1, 0), (3, 0), (4, 0)]
    # at layer 2: layer 4's expert is predicted unused this pass (its next use: layer 4 of the next pass, after
    # the next pass's layers 0 and 1), layer 3's predicted used
    p = layered_at(2, keys, {(3, 0): 0.9, (4, 0): 0.05})
    assert p.victim(keys) == (4, 0)
    assert p.victim([(0, 0), (1, 0), (3, 0)]) == (1, 0)  # then the earlier layers, the latest first
    # without a prediction every later expert counts as used this pass: the layered order of old
    plain = layered_at(2, keys)
    assert plain.victim(keys) == (1, 0) and plain.victim([(3, 0), (4, 0)]) == (4, 0)


def test_a_prefetch_never_evicts_an_expert_needed_before_it_or_before_the_next_pass():
    keys = [(0, 0), (2, 0), (3, 0), (4, 0), (5, 1)]
    p = layered_at(2, keys, {(3, 0): 0.9, (4, 0): 0.05, (5, 1): 0.95})
    assert p.may_replace((2, 0), (3, 1))  # the running layer's own expert: next needed by the next pass
    assert p.may_replace((4, 0), (3, 1))  # a later expert this pass is not expected to use
    assert not p.may_replace((0, 0), (3, 1))  # the next pass needs it before the running layer's experts
    assert not p.may_replace((5, 1), (3, 1))  # expected later in this pass: evicting it costs a read
    assert not p.may_replace((3, 0), (4, 1))  # needed before the prefetched one
    assert FIFOPolicy().may_replace((0, 0), (1, 0))  # a policy that does not look ahead cannot tell


def test_the_static_hot_set_is_never_pushed_out_by_a_guess():
    from sida.offload.policies import StaticHotSetPolicy

    p = StaticHotSetPolicy(hot=[(0, 1)])
    assert not p.may_replace((0, 1), (1, 0)) and p.may_replace((0, 2), (1, 0))


def test_a_decoder_steps_pass_starts_at_the_first_decoder_layer_so_the_encoders_experts_go_first():
    p = LayeredPolicy()
    keys = [(1, 0), (5, 0), (6, 0), (9, 0)]  # encoder layers 0-5, decoder layers 6-11
    for k in [(11, 0), *keys]:
        p.on_insert(k)
    p.expect({(6, 0): 0.9, (9, 0): 0.9}, start=6)  # a later decoder step: the encoder does not run again
    assert p.victim(keys) == (5, 0) and p.victim([(1, 0), (6, 0), (9, 0)]) == (1, 0)
