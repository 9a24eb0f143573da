import pytest

from sida.offload.policies import FIFOPolicy, LFUPolicy, LRUPolicy, make_policy


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


@pytest.mark.parametrize("cls", [FIFOPolicy, LRUPolicy, LFUPolicy])
def test_victim_only_among_candidates(cls):
    p = fill(cls(), "abcd")
    assert p.victim(["c", "d"]) in ("c", "d")
    with pytest.raises(ValueError):
        p.victim(["z"])


def test_make_policy():
    assert make_policy("fifo").name == "fifo"
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        make_policy("mru")
