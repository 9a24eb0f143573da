"""How likely a guessed expert is to be needed: the predictor's ranked guesses calibrated against the router's real
choices, and a layer's experts' chance of being used by a batch.

A guess source (the hash table, the decoder guess, the decode-step guess) ranks experts per token, each with the
source's own probability (the predictor's softmax) or none. `Calibration` counts, per rank and per tenth of that
probability, how often the ranked expert was among the router's choices for its token; counting starts from a prior
(the source's own probability, worth `PRIOR` observations), so that the first batches use the source's belief and
later ones what happened. The router sees every real token of an `exact` batch, so the counts come from live
traffic, the same traces a predictor is trained on.

`expected_use` turns a layer's calibrated guesses for every real token into the chance that each expert is used by
at least one of them (tokens taken as independent): what a prefetch of that expert is worth. What a token's guesses
leave goes to the experts it did not rank in proportion to how often the router has chosen each (`usage`): routers
are skewed, and a rarely chosen expert should not be expected as often as a popular one.
"""

from __future__ import annotations

import threading

import torch

BINS = 10  # tenths of the source's probability
PRIOR = 4.0  # observations the prior is worth
MAX_RANKS = 16


class Calibration:
    """P(a guessed expert is among its token's router choices | its rank, its probability's tenth), counted."""

    def __init__(self, prior: float = PRIOR):
        centre = (torch.arange(BINS, dtype=torch.float64) + 0.5) / BINS  # [bins] each tenth's middle
        self.seen = torch.full((MAX_RANKS, BINS), prior, dtype=torch.float64)  # [ranks, bins]
        self.hits = self.seen * centre  # prior: the source's own probability
        self.usage = torch.ones(0, dtype=torch.float64)  # [experts] router choices counted, from one each
        self._lock = threading.Lock()  # the inference thread counts while /info may read

    @staticmethod
    def _bins(probs: torch.Tensor | None, ranked: torch.Tensor, claims: int) -> torch.Tensor:
        """[n, K] the tenth of each guess's probability. A source with none claims its first `claims` guesses as the
        router's choices (the top tenth) and each later one less and less (1/(rank+1)); calibration learns the
        truth."""
        if probs is None:
            rank = torch.arange(ranked.shape[-1], dtype=torch.float64, device=ranked.device)
            probs = torch.where(rank < claims, 1.0, 1.0 / (rank + 1)).expand(ranked.shape)
        return (probs.double() * BINS).long().clamp(0, BINS - 1)

    def observe(self, ranked: torch.Tensor, probs: torch.Tensor | None, choices: torch.Tensor, claims: int = 1) -> None:
        """Count real tokens' guesses `ranked` [n, K] (with the source's `probs` [n, K], or None: see `_bins`) against
        the router's `choices` [n, k] (-1: none)."""
        ranked = ranked[:, :MAX_RANKS]
        hit = (ranked[:, :, None] == choices[:, None, :]).any(-1).double().cpu()  # [n, K]
        bins = self._bins(None if probs is None else probs[:, :MAX_RANKS], ranked, claims).cpu()  # [n, K]
        cell = torch.arange(ranked.shape[1])[None, :] * BINS + bins  # [n, K] flat (rank, bin)
        chosen = choices[choices >= 0].reshape(-1).cpu().long()
        with self._lock:
            self.seen.view(-1).index_add_(0, cell.reshape(-1), torch.ones(cell.numel(), dtype=torch.float64))
            self.hits.view(-1).index_add_(0, cell.reshape(-1), hit.reshape(-1))
            if chosen.numel():
                size = max(int(chosen.max()) + 1, len(self.usage))
                self.usage = torch.cat([self.usage, torch.ones(size - len(self.usage), dtype=torch.float64)])
                self.usage.index_add_(0, chosen, torch.ones(chosen.numel(), dtype=torch.float64))

    def calibrated(self, ranked: torch.Tensor, probs: torch.Tensor | None, claims: int = 1) -> torch.Tensor:
        """[n, K] the chance each guess of `ranked` [n, K] is needed, from the counts so far."""
        ranked = ranked[:, :MAX_RANKS]
        bins = self._bins(None if probs is None else probs[:, :MAX_RANKS], ranked, claims).cpu()
        cell = torch.arange(ranked.shape[1])[None, :] * BINS + bins
        with self._lock:
            rate = self.hits.view(-1)[cell] / self.seen.view(-1)[cell]
        return rate

    def weights(self, num_experts: int) -> torch.Tensor:
        """[experts] how often the router chose each expert, from one each (even before any count)."""
        with self._lock:
            usage = self.usage[:num_experts]
        return torch.cat([usage, torch.ones(num_experts - len(usage), dtype=torch.float64)])


def expected_use(
    ranked: torch.Tensor, chance: torch.Tensor, num_experts: int, usage: torch.Tensor | None = None
) -> dict[int, float]:
    """{expert: chance it is used by at least one token} from each real token's guesses `ranked` [n, K] and their
    calibrated chances `chance` [n, K]; what a token's ranked guesses leave goes to the experts it did not rank, in
    proportion to `usage` [experts] (even shares where None). Most likely first."""
    n, k = ranked.shape[0], min(ranked.shape[1], MAX_RANKS)
    if n == 0:
        return {}
    ranked, chance = ranked[:, :k].cpu().long(), chance[:, :k].clamp(0.0, 1.0)
    usage = torch.ones(num_experts, dtype=torch.float64) if usage is None else usage.double()
    weight = usage.expand(n, num_experts).clone()  # [n, E]
    weight.scatter_(1, ranked, 0.0)  # the unranked experts' weights
    rest = (1.0 - chance.sum(-1)).clamp_min(0.0)  # [n] what the ranked guesses leave
    per_token = weight * (rest / weight.sum(-1).clamp_min(1e-12))[:, None]  # [n, E] P(token uses expert)
    per_token.scatter_(1, ranked, chance)  # a token's ranked guesses are distinct experts
    used = -torch.expm1(torch.log1p(-per_token.clamp(max=1.0 - 1e-12)).sum(0))  # [E] 1 - prod(1 - p)
    order = used.argsort(descending=True, stable=True).tolist()
    return {e: float(used[e]) for e in order}
