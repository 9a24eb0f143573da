"""Calibration of guesses against the router, and a layer's experts' chance of being used by a batch."""

from __future__ import annotations

import pytest
import torch

from sida.offload.calibration import Calibration, expected_use


def test_before_any_count_a_guess_is_worth_the_sources_own_probability():
    cal = Calibration()
    ranked = torch.tensor([[3, 1, 0]])
    probs = torch.tensor([[0.72, 0.21, 0.05]])
    assert cal.calibrated(ranked, probs)[0].tolist() == pytest.approx([0.75, 0.25, 0.05])  # each tenth's middle
    # a source without probabilities: its first guess is its claim, the later ones less and less
    assert cal.calibrated(ranked, None)[0].tolist() == pytest.approx([0.95, 0.55, 0.35])


def test_counts_of_the_routers_choices_replace_the_prior():
    cal = Calibration()
    ranked = torch.tensor([[3, 1], [3, 1], [3, 1], [3, 1]])
    probs = torch.tensor([[0.9, 0.05]] * 4)
    choices = torch.tensor([[3], [1], [1], [1]])  # an overconfident first guess: right once in four
    for _ in range(250):
        cal.observe(ranked, probs, choices)
    got = cal.calibrated(ranked[:1], probs[:1])[0]
    assert got[0] == pytest.approx(0.25, abs=0.01) and got[1] == pytest.approx(0.75, abs=0.01)
    # other tenths of the same rank keep their prior
    assert cal.calibrated(ranked[:1], torch.tensor([[0.33, 0.33]]))[0].tolist() == pytest.approx([0.35, 0.35])


def test_a_guess_is_a_hit_when_it_is_any_of_the_tokens_router_choices():
    cal = Calibration(prior=0.0001)
    cal.observe(torch.tensor([[5, 6]]), None, torch.tensor([[6, 5]]))  # top-2 routing: both guesses used
    assert cal.calibrated(torch.tensor([[5, 6]]), None)[0].tolist() == pytest.approx([1.0, 1.0], abs=1e-3)


def test_expected_use_is_the_chance_that_at_least_one_real_token_uses_the_expert():
    ranked = torch.tensor([[0, 1], [0, 2]])
    chance = torch.tensor([[0.6, 0.3], [0.5, 0.4]], dtype=torch.float64)
    use = expected_use(ranked, chance, num_experts=4)
    assert use[0] == pytest.approx(1 - 0.4 * 0.5)
    # unranked by a token: an even share of what its ranked guesses leave
    assert use[1] == pytest.approx(1 - (1 - 0.3) * (1 - 0.1 / 2))
    assert use[3] == pytest.approx(1 - (1 - 0.1 / 2) * (1 - 0.1 / 2))
    assert list(use) == sorted(use, key=lambda e: -use[e])  # likeliest first
    assert expected_use(ranked[:0], chance[:0], 4) == {}


def test_a_top_k_familys_guesses_weigh_as_many_ranks_as_it_routes_and_claim_them():
    from sida.offload.moe_layer import RoutingContext

    ctx = RoutingContext(mode="exact", prefetch_k=1, routes=2, num_experts=8)  # every token uses two experts
    ranked = torch.tensor([[3, 5, 1]])  # a source without probabilities (a decode-step guess)
    chance = ctx.chances(("ahead", 0), ranked, None)
    assert chance[3] == pytest.approx(0.95) and chance[5] == pytest.approx(0.95)  # both claimed, not cut to k = 1
    assert chance[1] < 0.5  # beyond what it routes, a guess is worth less
