"""Expert execution: one call runs a MoE layer's routed experts from the cache's slots, for every model family.

Contract, the experts call of transformers' `ExpertsInterface`: `executor(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k], layer) -> [T, H]`. Each (token, choice) pair adds `weight × expert(hidden[token])` to the
token's row, cast to the hidden dtype after the product; an index outside [0, num_experts) means no expert for that
pair, and a token with no expert gets zeros (a residual, where the family has one, is added by the caller). Routing
(router, hash table, capacity, padding) is the caller's: the executor only runs experts.

Order of one call:
1. `cancel_prefetches`: this layer's prefetched experts it does not need give their unstarted reads back;
2. `waves`: the needed experts, ascending by id, split into groups that fit the budget, resident ones first;
3. per wave, `acquire` pins its experts (loading misses); after the first acquire, `prefetch` the experts of what
   runs next (from `next_keys(layer)`, each with its chance of being needed), protecting this layer's experts;
4. per expert of the wave, in the wave's order: compute its pairs (choice-major, tokens ascending), `release` it,
   then `prefetch` this layer's later waves and what runs next into its slot, protecting the rest of the wave;
5. `release` whatever the wave still holds, also when an expert forward raises: a failed batch pins nothing;
6. add the experts' weighted outputs into the result in ascending expert order, as the eager experts forward does,
   whatever order the waves ran them in: with three or more experts per token, floating-point sums depend on the
   order (the outputs are held until then: tokens × k rows of H).
Pairs are grouped by expert with one stable sort; reading where each expert's pairs begin (`.tolist()`) is the one
host sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch

from sida.offload.expert_layout import ExpertKey

ExpertForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]  # (params, x [n, H]) → [n, H]
# layer → {expert: chance it is needed} to load while the layer computes, for what runs after it, likeliest first
NextKeys = Callable[[int], dict[ExpertKey, float]]


class ExpertSlots(Protocol):
    """What expert execution needs from the device cache (`DeviceExpertCache`)."""

    def waves(self, keys: list[ExpertKey]) -> list[list[ExpertKey]]: ...

    def acquire(self, keys: list[ExpertKey]) -> dict[ExpertKey, dict[str, torch.Tensor]]: ...

    def release(self, keys: Iterable[ExpertKey]) -> None: ...

    def prefetch(
        self, keys: Iterable[ExpertKey], protect: Iterable[ExpertKey] = (), chance: dict[ExpertKey, float] | None = None
    ) -> int: ...

    def cancel_prefetches(self, layer: int, needed: Iterable[ExpertKey]) -> int: ...


class ExpertExecutor:
    """Runs any layer's routed experts of one model from `cache`; `expert_forward` computes one expert from its slot's
    parameter views, and `next_keys` names what to load ahead, so the executor holds no routing knowledge."""

    def __init__(self, cache: ExpertSlots, expert_forward: ExpertForward, num_experts: int, next_keys: NextKeys):
        self.cache = cache
        self.expert_forward = expert_forward
        self.num_experts = num_experts
        self.next_keys = next_keys

    def __call__(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, layer: int
    ) -> torch.Tensor:
        """hidden [tokens, H], top_k_index [tokens, k], top_k_weights [tokens, k] → [tokens, H], the weighted sum of
        each token's experts (zeros for a token with none)."""
        out = torch.zeros_like(hidden)  # [tokens, H]
        done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # expert → (its tokens [n], weight × output [n, H])
        pairs, starts = self._group(top_k_index)
        needed = [e for e in range(self.num_experts) if starts[e + 1] > starts[e]]
        keys = [(layer, e) for e in needed]
        self.cache.cancel_prefetches(layer, keys)  # guesses this layer turned out not to need
        upcoming = self.next_keys(layer)
        waves = self.cache.waves(keys)
        for i, wave in enumerate(waves):
            params = self.cache.acquire(wave)
            held = list(wave)  # released whatever happens, so a failed batch leaves no expert pinned
            try:
                later = [k for w in waves[i + 1 :] for k in w]  # this layer's experts of the waves still to come
                chance = {**upcoming, **dict.fromkeys(later, 1.0)}  # this layer's own are certain
                if i == 0:  # copies for what runs next overlap this layer's compute, never evicting its experts
                    self.cache.prefetch(list(upcoming), protect=set(keys), chance=upcoming)
                for j, key in enumerate(wave):
                    e = key[1]
                    pair = pairs[starts[e] : starts[e + 1]]  # [n] this expert's pairs
                    done[e] = self._run(hidden, top_k_weights, pair, params[key])
                    # The expert is done: its slot may take what comes next (this layer's later waves first,
                    # then what runs next) while the rest of the wave computes.
                    held.remove(key)
                    self.cache.release([key])
                    if later or upcoming:
                        self.cache.prefetch([*later, *upcoming], protect=set(wave[j + 1 :]), chance=chance)
            finally:
                self.cache.release(held)
        for e in sorted(done):  # summed in expert order whatever order they ran in, as the eager experts forward sums
            out.index_add_(0, *done[e])
        return out

    def _group(self, top_k_index: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(pairs [tokens × k]: the flat choice-major positions `choice × tokens + token`, stably sorted by expert;
        starts: where expert e's pairs begin in `pairs`, for e in 0..num_experts, the last where the pairs with no
        expert begin)."""
        by_choice = top_k_index.T.reshape(-1)  # [k × tokens], choice-major: tokens ascending within a choice
        valid = (by_choice >= 0) & (by_choice < self.num_experts)
        expert = torch.where(valid, by_choice, self.num_experts)  # no expert → the id after the last
        sorted_expert, pairs = torch.sort(expert, stable=True)  # [k × tokens] each
        ids = torch.arange(self.num_experts + 1, dtype=expert.dtype, device=expert.device)
        return pairs, torch.searchsorted(sorted_expert, ids).tolist()  # the one host sync

    def _run(
        self, hidden: torch.Tensor, top_k_weights: torch.Tensor, pair: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert over its pairs [n] (flat choice-major positions): (their tokens [n], weight × expert(x) [n, H]
        in the hidden dtype)."""
        tokens = hidden.shape[0]
        token, choice = pair % tokens, pair // tokens  # [n], [n]
        y = self.expert_forward(params, hidden[token])  # [n, H]
        return token, (y * top_k_weights[token, choice, None]).to(hidden.dtype)
