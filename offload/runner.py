"""Classification and completion over a loaded model: what `sida classify|complete|eval` and the server's
inference worker run.

Classification scores the task's label words: at the first decoder step of an encoder-decoder (text-to-text),
after the prompt's last token of a decoder-only model; every label costs one step and comes with a probability
over the label set. A decoder-only model's prompts are left-padded, so that every row's next token comes last.
A batch's hash table is built by `build_hash_table` (the server's batch worker calls it ahead; the one-shot
calls here call it just before) and handed to the engine with the batch. How tokens are chosen is in
sampling.py; the hooks `generate` calls after each token are in decoding.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from sida.offload.contracts import HashFunction
from sida.offload.decoding import PrefetchNextStep, TextWatch
from sida.offload.engine import OffloadEngine
from sida.offload.hash_table import HashTable
from sida.offload.model_loader import LoadedModel
from sida.offload.sampling import Sampler, Sampling, TokenLogprobs
from sida.offload.tasks import TASKS, Task, get_task

if TYPE_CHECKING:
    from sida.offload.decode_batch import DecodeBatch

Encoded = dict[str, torch.Tensor]  # input_ids, attention_mask: [batch, seq], right-padded


class NoChatTemplate(ValueError):
    """The model's tokenizer has no chat template, so a chat cannot become a prompt."""


@dataclass(frozen=True)
class Classification:
    """A label word and the probability of every label of the task."""

    label: str
    probs: dict[str, float]


@dataclass(frozen=True)
class Completion:
    """Generated text of one prompt, token counts and why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos) | "length"
    logprobs: TokenLogprobs | None = None
    first_token_at: float | None = field(default=None, compare=False)  # time.monotonic() of its first token
    ended_at: float | None = field(default=None, compare=False)  # ... and of its last


class Runner:
    """A loaded model, optionally under an offload `engine`, with an optional `hash_fn` that builds each batch's
    hash table. It is the `ServingRunner` the HTTP server holds (contracts.py)."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: str = "cpu",
        max_input_tokens: int = 512,
        engine: OffloadEngine | None = None,
        hash_fn: HashFunction | None = None,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(device)
        self.max_input_tokens = max_input_tokens
        self.engine = engine
        self.hash_fn = hash_fn
        self.causal = not loaded.is_encoder_decoder
        self.decode_batch: DecodeBatch | None = None  # continuous batching's running batch (the server attaches it)
        self._label_ids: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ inputs

    def label_ids(self, task: Task) -> list[int]:
        """Token id of each label word; every label word must be a single token of this tokenizer (after a space,
        as it follows a decoder-only prompt, where the tokenizer marks word starts)."""
        if task.name not in self._label_ids:
            ids = []
            for word in task.labels:
                spaced = self.tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
                pieces = (
                    spaced
                    if self.causal and len(spaced) == 1
                    else self.tokenizer(word, add_special_tokens=False)["input_ids"]
                )
                if len(pieces) != 1:
                    raise ValueError(f"label word {word!r} of task {task.name} is not one token in this tokenizer")
                ids.append(pieces[0])
            self._label_ids[task.name] = ids
        return self._label_ids[task.name]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the model was trained on them, not truncated (the server checks lengths): with the eos an
        encoder reads last; a decoder-only prompt without one (the model continues it)."""
        ids = self.tokenizer(texts)["input_ids"]
        eos = self.model.config.eos_token_id
        if self.causal:
            ids = [x[:-1] if len(x) > 1 and x[-1] == eos else x for x in ids]
        return ids

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat (`[{"role", "content"}, ...]`) through the tokenizer's chat template, ending where the
        assistant's answer begins; `NoChatTemplate` where the model ships none."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise NoChatTemplate("this model's tokenizer has no chat template: use /v1/completions")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own bos

    @property
    def pad_id(self) -> int:
        """The padding token: the config's, else the tokenizer's, else eos (decoder-only models often have none)."""
        for pad in (self.model.config.pad_token_id, self.tokenizer.pad_token_id, self.model.config.eos_token_id):
            if pad is not None:
                return int(pad)
        return 0

    def pad(self, ids: list[list[int]]) -> Encoded:
        """Pad token id lists into a batch on the runner's device: right for an encoder, left for a decoder-only
        model (its next token is then the last position of every row)."""
        width, pad = max(len(x) for x in ids), self.pad_id

        def place(row: list[int], fill: list[int]) -> list[int]:
            return fill + row if self.causal else row + fill

        input_ids = [place(x, [pad] * (width - len(x))) for x in ids]
        mask = [place([1] * len(x), [0] * (width - len(x))) for x in ids]
        return {
            "input_ids": torch.tensor(input_ids, device=self.device),
            "attention_mask": torch.tensor(mask, device=self.device),
        }

    def encode(self, prompts: list[str]) -> Encoded:
        """Tokenize and pad; inputs over `max_input_tokens` are cut (keeping the eos), as the CLI documents."""
        limit = self.max_input_tokens
        return self.pad([x if len(x) <= limit else self._cut(x) for x in self.tokenize(prompts)])

    def _cut(self, ids: list[int]) -> list[int]:
        """The first `max_input_tokens` of a prompt (an encoder's keeping its eos last)."""
        limit = self.max_input_tokens
        return ids[:limit] if self.causal else ids[: limit - 1] + ids[-1:]

    # ------------------------------------------------------------------ routing

    def build_hash_table(self, enc: Encoded, decoder_input_ids: torch.Tensor | None = None) -> HashTable | None:
        """The batch's hash table: the one place tables are built. None where there is no hash function or the
        engine has no use for one. `decoder_input_ids` [batch, steps] default to the start token."""
        if self.hash_fn is None or self.engine is None or not self.engine.wants_hash_table:
            return None
        if decoder_input_ids is None:  # stays None for a decoder-only model
            decoder_input_ids = self.loaded.decoder_start_ids(enc["input_ids"].shape[0], self.device)
        return self.hash_fn(enc["input_ids"], enc["attention_mask"], decoder_input_ids)

    def begin_batch(
        self,
        enc: Encoded,
        decoder_input_ids: torch.Tensor | None,
        hash_table: HashTable | None = None,
        shadow: bool = False,
    ) -> None:
        """Hand the batch's routing state to the engine (nothing without one)."""
        if self.engine is not None:
            first = None if self.causal else enc["input_ids"][:, 0]  # [batch] keys the first decoder step's guess
            self.engine.begin_batch(enc["attention_mask"], hash_table, decoder_input_ids, first, shadow)

    # ------------------------------------------------------------------ classification

    def classify(self, texts: list[str], task: str = "sst2") -> list[Classification]:
        """Raw texts of a single-text task (sst2), formatted by the task's own prompt."""
        t = get_task(task)
        return self.classify_prompts([t.prompt(x) for x in texts], t)

    def classify_prompts(self, prompts: list[str], task: Task) -> list[Classification]:
        """Prompts already in the task's text-to-text format (`Task.prompt`)."""
        enc = self.encode(prompts)
        return self.classify_ids(enc, task, self.build_hash_table(enc))

    @torch.inference_mode()
    def classify_ids(
        self, enc: Encoded, task: Task, hash_table: HashTable | None = None, shadow: bool = False
    ) -> list[Classification]:
        """One forward of a padded batch (encoder + first decoder step, or a decoder-only prompt); the label words'
        softmax per row, at the position that predicts the next token."""
        ids = self.label_ids(task)
        start = self.loaded.decoder_start_ids(enc["input_ids"].shape[0], self.device)  # [batch, 1] or None
        self.begin_batch(enc, start, hash_table, shadow)
        extra = {} if start is None else {"decoder_input_ids": start}
        logits = self.model(**enc, **extra).logits  # [batch, 1 or seq, vocab]
        probs = logits[:, -1, ids].float().softmax(-1).cpu()  # [batch, labels]
        return [
            Classification(task.labels[int(row.argmax())], {w: round(float(p), 6) for w, p in zip(task.labels, row)})
            for row in probs
        ]

    # ------------------------------------------------------------------ completion

    def complete(
        self,
        prompts: list[str],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stops: list[str] | None = None,
        on_text=None,
        sampling: Sampling | None = None,
        ignore_eos: bool = False,
    ) -> list[Completion]:
        """Continue raw prompts, every row sampled with `seed` (see `complete_ids`); `sampling`, when given, wins
        over `temperature` and `top_p`."""
        enc = self.encode(prompts)
        table = self.build_hash_table(enc)
        sampling = sampling or Sampling(temperature, top_p)
        seeds = [seed] * len(prompts)
        return self.complete_ids(enc, max_new_tokens, sampling, seeds, stops, on_text, table, ignore_eos=ignore_eos)

    @torch.inference_mode()
    def complete_ids(
        self,
        enc: Encoded,
        max_new_tokens: int = 32,
        sampling: Sampling | None = None,
        seeds: list[int | None] | None = None,
        stops: list[str] | None = None,
        on_text: Callable[[int, str], None] | None = None,
        hash_table: HashTable | None = None,
        shadow: bool = False,
        ignore_eos: bool = False,
    ) -> list[Completion]:
        """Generate for a padded batch. Row r samples from its own generator, seeded with `seeds[r]` (random where
        None), so that its tokens do not depend on the other rows. `on_text(row, delta)` is called as text appears
        (streaming); generation of a row ends at eos (unless `ignore_eos`), at a stop string (not included), or after
        max_new_tokens."""
        rows = enc["input_ids"].shape[0]
        sampling = sampling or Sampling()
        self.begin_batch(enc, self.loaded.decoder_start_ids(rows, self.device), hash_table, shadow)
        if self.engine is not None and self.engine.context.lookahead is not None:
            self.engine.context.lookahead.reset()  # a new batch's rows have no decode step before
        prefix = enc["input_ids"].shape[1] if self.causal else 1  # what generate's sequences hold before new tokens
        eos = None if ignore_eos else self.model.config.eos_token_id
        watch = TextWatch(self.tokenizer, eos, rows, stops or [], on_text, prefix)
        hooks = [watch] if self.engine is None else [watch, PrefetchNextStep(self.engine, watch, max_new_tokens)]
        sampler = None
        if not sampling.plain_greedy:
            sampler = Sampler(sampling, enc["input_ids"], seeds or [None] * rows, self.unpenalized_ids, prefix)
        out = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,  # greedy, or the one token `Sampler` left
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList([sampler] if sampler else []),
            stopping_criteria=StoppingCriteriaList(hooks),
            pad_token_id=self.pad_id,
            **({"eos_token_id": -1} if ignore_eos else {}),  # no token id: only max_new_tokens and stops end rows
        )  # [batch, prefix + generated]
        end = time.monotonic()
        steps = sampler.recorded() if sampler is not None and sampling.logprobs is not None else None
        results = []
        for r, (row, mask) in enumerate(zip(out[:, prefix:].tolist(), enc["attention_mask"])):
            stopped = watch.texts[r] if watch.stopped[r] else None
            rsteps = [s[r] for s in steps] if steps is not None else None
            timing = (watch.first_token_at, watch.ended_at[r] or end)
            results.append(self.completion(row, int(mask.sum()), stopped, rsteps, eos, timing))
        return results

    def completion(
        self,
        tokens: list[int],
        prompt_tokens: int,
        stopped: str | None,
        steps: list[tuple] | None,
        eos: int | None,
        timing: tuple[float | None, float | None] = (None, None),
    ) -> Completion:
        """One choice's `Completion` from the tokens generated (cut at `eos` where one ended it), the text kept
        where a stop string ended it (`stopped`), its recorded log-probs (`steps`) and (first, last) token times."""
        finished = eos is not None and eos in tokens
        tokens = tokens[: tokens.index(eos)] if finished else tokens
        text = stopped if stopped is not None else self.tokenizer.decode(tokens, skip_special_tokens=True)
        reason = "stop" if finished or stopped is not None else "length"
        logprobs = self.token_logprobs(tokens, text, steps) if steps is not None else None
        return Completion(text, prompt_tokens, len(tokens), reason, logprobs, *timing)

    # ------------------------------------------------------------------ token texts and log-probs

    @property
    def unpenalized_ids(self) -> set[int]:
        """Token ids a repetition penalty leaves alone: eos and padding, which every prompt carries."""
        return {self.model.config.eos_token_id, self.pad_id}

    def token_logprobs(self, tokens: list[int], text: str, steps: list[tuple]) -> TokenLogprobs:
        """The log-probs of a row's `tokens`, from what `Sampler` recorded at each step ((logprob, top ids, top
        logprobs) of this row), cut to the tokens that begin before the end of `text` (a stop string cuts it)."""
        pieces, offsets, prev = [], [], ""
        for i in range(len(tokens)):
            if len(prev) >= len(text):
                break
            cur = self.tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)
            pieces.append(cur[len(prev) :])
            offsets.append(len(prev))
            prev = cur
        top = []
        for i, (_, ids, lps) in enumerate(steps[: len(pieces)]):
            alternatives = {self.piece(tokens[max(0, i - 3) : i], t): lp for t, lp in zip(ids, lps)}
            top.append({**alternatives, pieces[i]: steps[i][0]})
        return TokenLogprobs(pieces, [s[0] for s in steps[: len(pieces)]], top, offsets)

    def piece(self, context: list[int], token: int) -> str:
        """The text `token` adds after `context` (a special token: its own name)."""
        if token in self.tokenizer.all_special_ids:
            return self.tokenizer.convert_ids_to_tokens(token)
        before = self.tokenizer.decode(context, skip_special_tokens=True)
        return self.tokenizer.decode([*context, token], skip_special_tokens=True)[len(before) :]

    def prompt_pieces(self, prompt: str) -> list[tuple[str, int]]:
        """(text, offset) of each of the prompt's tokens, special tokens left out; a token's text runs from the
        end of the one before, so that the pieces cover the prompt (the tokenizer may normalize what it reads)."""
        enc = self.tokenizer(prompt, return_offsets_mapping=True, return_special_tokens_mask=True)
        pieces, end = [], 0
        for (_, stop), special in zip(enc["offset_mapping"], enc["special_tokens_mask"]):
            if not special:
                pieces.append((prompt[end:stop], end))
                end = stop
        return pieces

    # ------------------------------------------------------------------ tasks

    @property
    def tasks(self) -> list[str]:
        """The classification tasks this model serves: those its config names (`sida_labels`), or else every known
        task whose label words are single tokens of its tokenizer."""
        named = getattr(self.model.config, "sida_labels", None)
        if named:
            return sorted(t for t in named if t in TASKS)
        served = []
        for name, task in sorted(TASKS.items()):
            try:
                self.label_ids(task)
            except ValueError:
                continue
            served.append(name)
        return served
