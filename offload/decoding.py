"""The hooks the decode loop (`generate`) calls after each new token, as `StoppingCriteria` in this order:
`TextWatch` streams each row's new text and ends rows at eos or a stop string; `PrefetchNextStep` never ends a
row: it tells the engine which tokens the next decoder step reads, so that step's experts start loading now.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import StoppingCriteria

if TYPE_CHECKING:
    from sida.offload.engine import OffloadEngine


class TextWatch(StoppingCriteria):
    """Streams the new text of each row (`on_text(row, delta)`) and ends rows at eos or at a stop string (the text
    kept ends before it). `texts` and `stopped` hold each row's text so far and whether a stop string ended it;
    `done` [batch] is the verdict of the latest call. `eos` None: the end-of-sequence token ends nothing (vLLM's
    `ignore_eos`). `prefix`: the tokens before the generated ones in `generate`'s
    sequences (an encoder-decoder's start token, a decoder-only model's padded prompt)."""

    def __init__(
        self,
        tokenizer,
        eos_token_id: int | None,
        rows: int,
        stops: list[str],
        on_text: Callable[[int, str], None] | None,
        prefix: int = 1,
    ):
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.eos = eos_token_id
        self.stops = stops
        self.on_text = on_text
        self.texts = [""] * rows
        self.stopped = [False] * rows
        self.done: torch.Tensor | None = None
        self.first_token_at: float | None = None  # time.monotonic() of the first token (every row's, in one batch)
        self.ended_at: list[float | None] = [None] * rows  # when each row ended (None: it ran to max_new_tokens)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        """input_ids [batch, prefix + generated] → done [batch] (bool)."""
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        rows = input_ids[:, self.prefix :].tolist()
        done = torch.tensor([self.update(r, row, now) for r, row in enumerate(rows)], device=input_ids.device)
        self.done = done
        return done

    def update(self, r: int, row: list[int], now: float | None = None) -> bool:
        """Row r has generated `row` so far: stream its new text; whether it has ended (eos, a stop string)."""
        if self.stopped[r]:
            return True
        ended = self.eos is not None and self.eos in row
        text = self.tokenizer.decode(row[: row.index(self.eos)] if ended else row, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            text, self.stopped[r], ended = text[:cut], True, True
        if self.on_text is not None and text.startswith(self.texts[r]) and len(text) > len(self.texts[r]):
            self.on_text(r, text[len(self.texts[r]) :])
        if text.startswith(self.texts[r]):
            self.texts[r] = text
        if ended and self.ended_at[r] is None:
            self.ended_at[r] = now if now is not None else time.monotonic()
        return ended


class PrefetchNextStep(StoppingCriteria):
    """The decode step's prefetch: after each token, unless `watch` has ended every row or `max_new_tokens` are
    generated, hands the engine the tokens the next decoder step reads (`begin_decoder_step`). Never ends a row;
    it goes after `watch` in the criteria, whose verdict on this token it reads."""

    def __init__(self, engine: OffloadEngine, watch: TextWatch, max_new_tokens: int):
        self.engine = engine
        self.watch = watch
        self.max_new_tokens = max_new_tokens

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        """input_ids [batch, prefix + generated] → not done [batch]."""
        finished = self.watch.done is not None and bool(self.watch.done.all())
        if not finished and input_ids.shape[1] - self.watch.prefix < self.max_new_tokens:
            last = 2 if self.engine.context.causal else 1  # a decoder-only model's guess reads the token before too
            self.engine.begin_decoder_step(input_ids[:, -last:])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
