"""Continuous batching of a decoder-only model: the running decode batch, which sequences join after their prompt's
forward (prefill) and leave as soon as they end, one decode step at a time (iteration-level scheduling, as in Orca,
vLLM and TGI), under a KV-cache bound in bytes.

    admit(sequences, enc, table)   one forward of their padded prompts (the batch's hash table and prompt mask
                                   handed to the engine first), their first token, their cache joined to the rest
    step()                         engine.begin_decode_step (the expert engine's per-step hook), one forward of
                                   every running sequence's last token, each row's next token, the ended leave

A sequence's KV cache is worst-case bounded at admission: the batch's rows share one left-padded width, which never
exceeds the longest row's prompt + max_new_tokens, so (rows × that width × bytes per token) is what the cache may
grow to; `room_for` admits only while that stays within `kv_bound` bytes. Rows are left-padded and their
`position_ids` count only their own tokens, so a sequence's tokens do not depend on the batch it runs in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from sida.offload import kv_cache
from sida.offload.decoding import TextWatch
from sida.offload.hash_table import HashTable
from sida.offload.sampling import Sampling, choose, generators, host_record

if TYPE_CHECKING:
    from sida.offload.runner import Completion, Encoded, Runner


@dataclass(eq=False)
class Sequence:
    """One choice to generate: its prompt's token ids and how to continue it; `tag` is the caller's (the server's
    request). The rest is the decode batch's state of it."""

    ids: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    on_text: Callable[[str], None] | None = None
    tag: Any = None
    generated: list[int] = field(default_factory=list)
    result: Completion | None = None  # set when it has ended
    _watch: TextWatch | None = None
    _prompt: torch.Tensor | None = None  # [1, prompt tokens] what repetition penalties read
    _gens: list[torch.Generator] = field(default_factory=list)
    _steps: list[tuple] = field(default_factory=list)  # recorded log-probs, one per token
    _first_token_at: float | None = None

    @property
    def worst_tokens(self) -> int:
        """The most positions its cache can reach."""
        return len(self.ids) + self.max_new_tokens


class DecodeBatch:
    """The running sequences of one model, their KV cache and attention mask; only the inference thread calls it."""

    def __init__(self, runner: Runner, kv_bound: int | None = None, kv_per_token: int | None = None):
        self.runner = runner
        self.model = runner.model
        self.engine = runner.engine
        self.cache_arg = kv_cache.cache_argument(self.model)
        self.kv_per_token = kv_per_token or self.measure_kv_per_token()
        self.kv_bound = kv_bound  # bytes; None: unbounded (the caller's limits hold)
        self.running: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, width] 1 where a column holds a row's token
        self.steps = 0  # decode steps run

    def measure_kv_per_token(self) -> int:
        """Bytes one token adds to the cache, from a one-token forward."""
        one = torch.tensor([[self.runner.pad_id]], device=self.runner.device)
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            self.model(input_ids=one, use_cache=True, **{self.cache_arg: cache})
        if self.engine is not None:
            self.engine.reset_stats()  # a start-up forward, not a request's
        return kv_cache.nbytes(cache)

    # ------------------------------------------------------------------ memory

    def bind(self, kv_bound: int) -> None:
        """Bound the running sequences' KV cache to `kv_bound` bytes, placed on the engine's device-memory account
        (kind `kv_cache`; a DeviceMemoryError past its declared limit)."""
        if self.engine is not None:
            self.engine.memory.place("kv_cache", kv_bound)
        self.kv_bound = kv_bound

    def summary(self) -> dict:
        """What `/info` reports of the running batch and its KV cache."""
        return {
            "running": len(self.running),
            "kv_cache_bytes": self.kv_bytes,
            "kv_cache_reserved_bytes": self.kv_reserved,
            "kv_cache_bound_bytes": self.kv_bound,
            "kv_bytes_per_token": self.kv_per_token,
            "decode_steps": self.steps,
        }

    @property
    def kv_bytes(self) -> int:
        """Bytes the running sequences' cache holds now."""
        return kv_cache.nbytes(self.cache)

    @property
    def kv_reserved(self) -> int:
        """Bytes the running sequences' cache may grow to (what admission checks)."""
        return self.reserved_bytes(self.running)

    def reserved_bytes(self, seqs: list[Sequence]) -> int:
        """The most bytes a batch of `seqs` may hold: rows × the widest worst case × bytes per token."""
        return len(seqs) * max((s.worst_tokens for s in seqs), default=0) * self.kv_per_token

    def fits_alone(self, seq: Sequence) -> bool:
        """Whether `seq` fits the bound even with nothing else running."""
        return self.kv_bound is None or self.reserved_bytes([seq]) <= self.kv_bound

    def room_for(self, seqs: list[Sequence]) -> int:
        """How many of `seqs`, in order, may join the running batch now without passing the bound."""
        if self.kv_bound is None:
            return len(seqs)
        n = 0
        while n < len(seqs) and self.reserved_bytes([*self.running, *seqs[: n + 1]]) <= self.kv_bound:
            n += 1
        return n

    # ------------------------------------------------------------------ the loop

    @torch.inference_mode()
    def admit(
        self, seqs: list[Sequence], enc: Encoded, table: HashTable | None = None, shadow: bool = False
    ) -> list[Sequence]:
        """Prefill `seqs` (their prompts padded in `enc`, left, as `Runner.pad` does) and choose their first token;
        those not ended join the running batch. Returns the sequences that ended at once."""
        self.runner.begin_batch(enc, None, table, shadow)
        mask = enc["attention_mask"]
        cache = DynamicCache(config=self.model.config)
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as `generate` places them
        out = self.model(
            input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids, use_cache=True,
            logits_to_keep=1, **{self.cache_arg: cache},
        )  # fmt: skip
        for i, s in enumerate(seqs):
            self._start(s, enc["input_ids"][i, mask[i].bool()])
        ended = self._advance(seqs, out.logits[:, -1])
        live = [i for i, s in enumerate(seqs) if s.result is None]
        if live:
            kept = mask[live]
            drop = _leading_padding(kept)
            cache = kv_cache.keep(cache, live, drop)
            self._join(cache, kept[:, drop:], [seqs[i] for i in live])
        return ended

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One decode step of every running sequence; returns those that ended on it."""
        if not self.running:
            return []
        pairs = [[s.generated[-2] if len(s.generated) > 1 else s.ids[-1], s.generated[-1]] for s in self.running]
        pairs = torch.tensor(pairs, device=self.runner.device)  # [rows, 2]: the token before, the token read
        last = pairs[:, 1:]  # [rows, 1]
        if self.engine is not None:
            self.engine.begin_decode_step(pairs)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        position_ids = self.mask.sum(-1, keepdim=True) - 1  # [rows, 1]: the row's own tokens before this one
        out = self.model(
            input_ids=last, attention_mask=self.mask, position_ids=position_ids, use_cache=True,
            **{self.cache_arg: self.cache},
        )  # fmt: skip
        self.steps += 1
        ended = self._advance(self.running, out.logits[:, -1])
        if ended:
            self._leave([i for i, s in enumerate(self.running) if s.result is None])
        return ended

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop running sequences that will not be answered (deadline passed, client gone)."""
        gone = {id(s) for s in seqs}
        self._leave([i for i, s in enumerate(self.running) if id(s) not in gone])

    def clear(self) -> list[Sequence]:
        """Drop every running sequence (after a failed step) and return them."""
        running, self.running, self.cache, self.mask = self.running, [], None, None
        self._rows_changed([], 0)
        return running

    # ------------------------------------------------------------------ rows

    def _start(self, s: Sequence, prompt: torch.Tensor) -> None:
        tok = self.runner.tokenizer
        eos = None if s.ignore_eos else self.model.config.eos_token_id
        on_text = None if s.on_text is None else (lambda _row, delta, f=s.on_text: f(delta))
        s._watch = TextWatch(tok, eos, 1, s.stops, on_text, prefix=0)
        s._gens = generators(s.sampling, [s.seed], prompt.device)
        s._prompt = prompt[None]  # [1, prompt tokens]

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        """Each row's next token from its logits [rows, vocab]; returns the rows that ended with it."""
        chosen = self._choose(seqs, logits)
        now = time.monotonic()
        ended = []
        for s, tok in zip(seqs, chosen):
            s.generated.append(tok)
            if s._first_token_at is None:
                s._first_token_at = now
            done = s._watch.update(0, s.generated, now)
            if done or len(s.generated) >= s.max_new_tokens:
                s.result = self._result(s, now)
                ended.append(s)
        return ended

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """The next token of each row: one argmax for the plain greedy rows, `choose` row by row for the others."""
        chosen = logits.argmax(-1).tolist()
        unpenalized = sorted(self.runner.unpenalized_ids)
        for i, s in enumerate(seqs):
            if s.sampling.plain_greedy:
                continue
            generated = torch.tensor([s.generated], dtype=torch.long, device=logits.device)
            tok, record = choose(s.sampling, logits[i : i + 1], s._prompt, generated, s._gens, unpenalized)
            chosen[i] = int(tok[0])
            if record is not None:
                s._steps.append(host_record(record)[0])
        return chosen

    def _result(self, s: Sequence, now: float) -> Completion:
        w = s._watch
        eos = w.eos
        steps = s._steps if s.sampling.logprobs is not None else None
        stopped = w.texts[0] if w.stopped[0] else None
        return self.runner.completion(s.generated, len(s.ids), stopped, steps, eos, (s._first_token_at, now))

    def _join(self, cache: DynamicCache, mask: torch.Tensor, seqs: list[Sequence]) -> None:
        self._rows_changed(list(range(len(self.running))), len(seqs))
        if self.mask is None:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            self.cache = kv_cache.join(self.cache, cache)
            self.mask = torch.cat([kv_cache.pad_left(self.mask, width, -1), kv_cache.pad_left(mask, width, -1)])
        self.running.extend(seqs)

    def _rows_changed(self, keep: list[int], added: int) -> None:
        """Tell the engine's decode-step guess which rows carry over (lookahead.py keeps each row's last step)."""
        ahead = self.engine.context.lookahead if self.engine is not None else None
        if ahead is not None:
            ahead.rows_changed(keep, added)

    def _leave(self, rows: list[int]) -> None:
        """Keep only `rows` of the running batch, without the padding columns they all have first."""
        if not rows:
            self.clear()
            return
        self._rows_changed(rows, 0)
        kept = self.mask[rows]
        drop = _leading_padding(kept)
        self.cache = kv_cache.keep(self.cache, rows, drop)
        self.mask = kept[:, drop:]
        self.running = [self.running[i] for i in rows]


def _leading_padding(mask: torch.Tensor) -> int:
    """Columns at the start of `mask` [rows, width] where no row has a token."""
    used = mask.any(0).nonzero()
    return int(used[0]) if used.numel() else mask.shape[1]
