"""The budget decision: explicit budgets, half, and auto's arithmetic (pure: no model, no device)."""

import pytest

from sida.offload.budget import AUTO_MARGIN, auto_budget, explicit_budget

MIB = 2**20


def test_explicit_budgets_win_and_are_capped_at_every_expert():
    assert explicit_budget("auto", 10, None, MIB, 96).slots == 10
    assert explicit_budget("auto", 500, None, MIB, 96).slots == 96
    assert explicit_budget("auto", None, 10 * MIB + 1, MIB, 96).slots == 10
    assert explicit_budget("half", None, None, MIB, 96).slots == 48
    assert explicit_budget("half", None, None, MIB, 1).slots == 1
    assert explicit_budget("auto", None, None, MIB, 96) is None  # needs a measurement


@pytest.mark.parametrize(
    "args, match",
    [
        (("half", 3, MIB, MIB, 8), "not both"),
        (("half", 0, None, MIB, 8), "at least 1 expert"),
        (("half", None, MIB - 1, MIB, 8), "below one expert"),
        (("most", None, None, MIB, 8), "unknown budget"),
    ],
)
def test_budgets_that_cannot_work(args, match):
    with pytest.raises(ValueError, match=match):
        explicit_budget(*args)


def test_auto_keeps_the_measured_headroom_free():
    d = auto_budget(free_bytes=100 * MIB, headroom_bytes=20 * MIB, expert_bytes=MIB, total_experts=500, held=1)
    assert d.slots == 1 + (100 * MIB - int(20 * MIB * AUTO_MARGIN)) // MIB
    assert d.source == "auto" and "20 MiB measured" in d.reason


def test_auto_never_goes_below_what_is_held_nor_above_every_expert():
    assert auto_budget(10 * MIB, 50 * MIB, MIB, 500, held=1).slots == 1
    assert auto_budget(10_000 * MIB, 0, MIB, 96, held=1).slots == 96
