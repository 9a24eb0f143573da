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
