"""Classification and completion over a loaded model: what `sida classify|complete|eval` and the server's
inference worker run.

Classification is text-to-text: the label is the task's label word with the highest first-decoder-step
logit, so every label costs one decoder step and comes with a probability over the label set.
A batch's hash table is built by `hash_table` (the predictor worker calls it ahead; the one-shot calls here
call it just before) and handed to the engine with the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from sida.offload.datasets import Task, get_task
from sida.offload.hash_table import HashTable
from sida.offload.model_loader import LoadedModel

Encoded = dict[str, torch.Tensor]  # input_ids, attention_mask: [batch, seq], right-padded


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


class Runner:
    """A loaded model, optionally under an offload `engine`, with an optional `hash_fn`
    (input_ids, attention_mask, decoder_input_ids → HashTable)."""

    def __init__(
        self, loaded: LoadedModel, device: str = "cpu", max_input_tokens: int = 512, engine=None, hash_fn=None
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(device)
        self.max_input_tokens = max_input_tokens
        self.engine = engine
        self.hash_fn = hash_fn
        self._label_ids: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ inputs

    def label_ids(self, task: Task) -> list[int]:
        """Token id of each label word; every label word must be a single token of this tokenizer."""
        if task.name not in self._label_ids:
            ids = []
            for word in task.labels:
                pieces = self.tokenizer(word, add_special_tokens=False)["input_ids"]
                if len(pieces) != 1:
                    raise ValueError(f"label word {word!r} of task {task.name} is not one token in this tokenizer")
                ids.append(pieces[0])
            self._label_ids[task.name] = ids
        return self._label_ids[task.name]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the eos the model was trained with, not truncated (the server checks lengths)."""
        return self.tokenizer(texts)["input_ids"]

    def pad(self, ids: list[list[int]]) -> Encoded:
        """Right-pad token id lists into a batch on the runner's device."""
        width = max(len(x) for x in ids)
        pad = self.model.config.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=self.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=self.device)
        return {"input_ids": input_ids, "attention_mask": mask}

    def encode(self, prompts: list[str]) -> Encoded:
        """Tokenize and pad; inputs over `max_input_tokens` are cut (keeping the eos), as the CLI documents."""
        limit = self.max_input_tokens
        return self.pad([x if len(x) <= limit else x[: limit - 1] + x[-1:] for x in self.tokenize(prompts)])

    # ------------------------------------------------------------------ routing

    def hash_table(self, enc: Encoded, decoder_input_ids: torch.Tensor | None = None) -> HashTable | None:
        """The batch's hash table: the one place tables are built. None where there is no hash function or the
        engine has no use for one. `decoder_input_ids` [batch, steps] default to the start token."""
        if self.hash_fn is None or self.engine is None or not self.engine.wants_hash_table:
            return None
        if decoder_input_ids is None:
            decoder_input_ids = self.loaded.decoder_start_ids(enc["input_ids"].shape[0], self.device)
        return self.hash_fn(enc["input_ids"], enc["attention_mask"], decoder_input_ids)

    def begin_batch(
        self, enc: Encoded, decoder_input_ids: torch.Tensor, hash_table: HashTable | None = None, shadow: bool = False
    ) -> None:
        """Hand the batch's routing state to the engine (nothing without one)."""
        if self.engine is not None:
            first = enc["input_ids"][:, 0]  # [batch] keys the decoder guess of the first step
            self.engine.begin_batch(enc["attention_mask"], hash_table, decoder_input_ids, first, shadow)

    # ------------------------------------------------------------------ classification

    def classify(self, texts: list[str], task: str = "sst2") -> list[Classification]:
        """Raw texts of a single-text task (sst2), formatted by the task's own prompt."""
        t = get_task(task)
        return self.classify_prompts([t.prompt(x) for x in texts], t)

    def classify_prompts(self, prompts: list[str], task: Task) -> list[Classification]:
        """Prompts already in the task's text-to-text format (`Task.prompt`)."""
        enc = self.encode(prompts)
        return self.classify_ids(enc, task, self.hash_table(enc))

    @torch.inference_mode()
    def classify_ids(
        self, enc: Encoded, task: Task, hash_table: HashTable | None = None, shadow: bool = False
    ) -> list[Classification]:
        """One forward (encoder + first decoder step) of a padded batch; the label words' softmax per row."""
        ids = self.label_ids(task)
        start = self.loaded.decoder_start_ids(enc["input_ids"].shape[0], self.device)  # [batch, 1]
        self.begin_batch(enc, start, hash_table, shadow)
        logits = self.model(**enc, decoder_input_ids=start).logits  # [batch, 1, vocab]
        probs = logits[:, 0, ids].float().softmax(-1).cpu()  # [batch, labels]
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
    ) -> list[Completion]:
        """Continue raw prompts (see `complete_ids`)."""
        enc = self.encode(prompts)
        table = self.hash_table(enc)
        return self.complete_ids(enc, max_new_tokens, temperature, top_p, seed, stops, on_text, table)

    @torch.inference_mode()
    def complete_ids(
        self,
        enc: Encoded,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stops: list[str] | None = None,
        on_text: Callable[[int, str], None] | None = None,
        hash_table: HashTable | None = None,
        shadow: bool = False,
    ) -> list[Completion]:
        """Generate for a padded batch. `on_text(row, delta)` is called as text appears (streaming);
        generation of a row ends at eos, at a stop string (not included), or after max_new_tokens."""
        rows = enc["input_ids"].shape[0]
        self.begin_batch(enc, self.loaded.decoder_start_ids(rows, self.device), hash_table, shadow)
        watch = _TextWatch(self, rows, stops or [], on_text, max_new_tokens)
        sample = temperature > 0
        if seed is not None:
            torch.manual_seed(seed)
        out = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            stopping_criteria=StoppingCriteriaList([watch]),
        )  # [batch, 1 + generated], starts with the decoder start token
        eos = self.model.config.eos_token_id
        results = []
        for r, (row, mask) in enumerate(zip(out[:, 1:].tolist(), enc["attention_mask"])):
            finished = eos in row  # after eos, generate pads the row
            tokens = row[: row.index(eos)] if finished else row
            text = watch.texts[r] if watch.stopped[r] else self.tokenizer.decode(tokens, skip_special_tokens=True)
            reason = "stop" if finished or watch.stopped[r] else "length"
            results.append(Completion(text, int(mask.sum()), len(tokens), reason))
        return results


class _TextWatch(StoppingCriteria):
    """Called by `generate` after each new token: streams the new text of each row, ends rows at eos or a stop
    string, and tells the engine which tokens the next decoder step reads."""

    def __init__(self, runner: Runner, rows: int, stops: list[str], on_text, max_new_tokens: int):
        self.runner = runner
        self.stops = stops
        self.on_text = on_text
        self.max_new_tokens = max_new_tokens
        self.texts = [""] * rows
        self.stopped = [False] * rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        """input_ids [batch, 1 + generated] → done [batch] (bool)."""
        eos = self.runner.model.config.eos_token_id
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for r, row in enumerate(input_ids[:, 1:].tolist()):
            if self.stopped[r]:
                done[r] = True
                continue
            ended = eos in row
            text = self.runner.tokenizer.decode(row[: row.index(eos)] if ended else row, skip_special_tokens=True)
            cut = min((text.find(s) for s in self.stops if s in text), default=-1)
            if cut >= 0:
                text, self.stopped[r], done[r] = text[:cut], True, True
            if self.on_text is not None and text.startswith(self.texts[r]) and len(text) > len(self.texts[r]):
                self.on_text(r, text[len(self.texts[r]) :])
            if text.startswith(self.texts[r]):
                self.texts[r] = text
            done[r] |= ended
        engine = self.runner.engine
        if engine is not None and not bool(done.all()) and input_ids.shape[1] - 1 < self.max_new_tokens:
            engine.begin_decoder_step(input_ids[:, -1:])
        return done
