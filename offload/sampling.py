"""How each next token is chosen: the `Sampling` parameters, the `Sampler` that applies them inside `generate`,
and the per-token log-probs it records (`TokenLogprobs`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen. Penalties follow OpenAI (`presence_penalty`, `frequency_penalty`: subtracted
    from the logits of tokens already generated, once / per occurrence) and vLLM (`repetition_penalty`: the logit
    of a token in the prompt or generated so far is divided by it if positive, multiplied if negative; 1 = off).
    `temperature` 0 is greedy. `logprobs` k: record the sampled token's and the k likeliest tokens' log-probs."""

    temperature: float = 0.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    @property
    def plain_greedy(self) -> bool:
        """Nothing for `Sampler` to do: generate's own argmax chooses."""
        penalties = (self.presence_penalty, self.frequency_penalty, self.repetition_penalty - 1)
        return self.temperature == 0 and not any(penalties) and self.logprobs is None


@dataclass(frozen=True)
class TokenLogprobs:
    """Per generated token: its text (the pieces concatenate to the completion's text), the model's log-prob of
    it, the top alternatives' log-probs by text (the sampled token's among them) and its offset in the text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class Sampler(LogitsProcessor):
    """Chooses each row's next token inside `generate` (`choose`) and leaves `generate` only that token (every
    other score -inf); with `logprobs` it records what `choose` reports at each step.

    `prompt_ids` [batch, seq]: the padded prompts (padding must be among `unpenalized`); row r draws from a
    generator seeded with `seeds[r]` (random where None). `prefix`: the tokens `generate`'s sequences hold before
    the generated ones (an encoder-decoder's start token; a decoder-only model's padded prompt)."""

    def __init__(
        self, s: Sampling, prompt_ids: torch.Tensor, seeds: list[int | None], unpenalized: set[int], prefix: int = 1
    ):
        self.s = s
        self.prefix = prefix
        self.generators = generators(s, seeds, prompt_ids.device)
        self.unpenalized = sorted(unpenalized)
        self.prompt_ids = prompt_ids
        self.steps: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids [batch, prefix + generated], scores [batch, vocab] → scores with one finite."""
        generated = input_ids[:, self.prefix :]
        chosen, record = choose(self.s, scores, self.prompt_ids, generated, self.generators, self.unpenalized)
        if record is not None:
            self.steps.append(record)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)

    def recorded(self) -> list[list[tuple[float, list[int], list[float]]]]:
        """Per step, per row: (the chosen token's log-prob, the top-k token ids, their log-probs), on the host."""
        return [host_record(step) for step in self.steps]


def host_record(record: tuple[torch.Tensor, ...]) -> list[tuple[float, list[int], list[float]]]:
    """One step's record of `choose` as, per row, (the chosen token's log-prob, top-k ids, their log-probs)."""
    chosen, ids, lps = (t.tolist() for t in record)
    return list(zip(chosen, ids, lps))


def generators(s: Sampling, seeds: list[int | None], device: torch.device) -> list[torch.Generator]:
    """One generator per row, seeded with `seeds[r]` (random where None); none for greedy choices."""
    if s.temperature == 0:
        return []
    seeds = [x if x is not None else secrets.randbits(63) for x in seeds]
    return [torch.Generator(device).manual_seed(x % 2**64) for x in seeds]


def choose(
    s: Sampling,
    scores: torch.Tensor,
    prompt_ids: torch.Tensor,
    generated: torch.Tensor,
    gens: list[torch.Generator],
    unpenalized: list[int],
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Each row's next token [batch] from its logits `scores` [batch, vocab]: penalties (given the padded prompts
    [batch, seq] and the tokens generated so far [batch, steps]), then greedy or temperature and top-p, drawn from
    row r's generator `gens[r]`. With `s.logprobs`, also (the chosen token's log-prob [batch], the top-k ids and
    log-probs [batch, k]), the model's own log-probs, before penalties and temperature."""
    raw = scores.float()
    x = penalize(s, raw, prompt_ids, generated, unpenalized)
    if s.temperature == 0:
        chosen = x.argmax(-1)  # [batch]
    else:
        probs = _top_p((x / s.temperature).softmax(-1), s.top_p)
        noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in gens])
        noise.clamp_min_(1e-20)  # a draw of exactly 0 would make 0/0 (NaN) of a token top-p removed
        chosen = (probs / noise).argmax(-1)  # an exponential race: row r draws token t with probability p[r, t]
    if s.logprobs is None:
        return chosen, None
    lp = raw.log_softmax(-1)
    top = lp.topk(s.logprobs, -1)
    return chosen, (lp.gather(1, chosen[:, None])[:, 0], top.indices, top.values)


def penalize(
    s: Sampling, x: torch.Tensor, prompt_ids: torch.Tensor, generated: torch.Tensor, unpenalized: list[int]
) -> torch.Tensor:
    """The logits x [batch, vocab] with vLLM's repetition penalty, then OpenAI's frequency and presence penalties,
    given the prompts [batch, seq] and the tokens generated so far [batch, steps]."""
    if s.repetition_penalty != 1.0:
        seen = torch.zeros_like(x, dtype=torch.bool)
        seen.scatter_(1, prompt_ids, True).scatter_(1, generated, True)
        seen[:, unpenalized] = False
        x = torch.where(seen, torch.where(x > 0, x / s.repetition_penalty, x * s.repetition_penalty), x)
    if s.frequency_penalty or s.presence_penalty:
        counts = torch.zeros_like(x).scatter_add_(1, generated, torch.ones_like(generated, dtype=x.dtype))
        x = x - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).to(x.dtype)
    return x


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [batch, vocab] with all but the smallest set of likeliest tokens whose mass reaches `top_p` zeroed."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(-1, descending=True)
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)
