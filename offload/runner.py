"""Classification and completion over a loaded model: what `sida classify|complete|eval` (and later the server) run.

Classification is text-to-text: the label is the task's label word with the highest first-decoder-step
logit, so every label costs one decoder step and comes with a probability over the label set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sida.offload.datasets import Task, get_task
from sida.offload.model_loader import LoadedModel


@dataclass(frozen=True)
class Classification:
    label: str
    probs: dict[str, float]


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos) | "length"


class Runner:
    """`engine` (offload) and `hash_fn` (input_ids, attention_mask, decoder_input_ids → HashTable) are optional."""

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

    def hash_table(self, enc: dict[str, torch.Tensor], decoder_input_ids: torch.Tensor):
        """The batch's hash table, or None where there is no hash function or the engine has no use for one."""
        if self.hash_fn is None or self.engine is None or not self.engine.wants_hash_table:
            return None
        return self.hash_fn(enc["input_ids"], enc["attention_mask"], decoder_input_ids)

    def _begin_batch(self, enc: dict[str, torch.Tensor], decoder_input_ids: torch.Tensor, table=None) -> None:
        """Hand the batch's hash table (given, e.g. built ahead by the predictor worker, or built now) to the engine."""
        if self.engine is None:
            return
        if table is None:
            table = self.hash_table(enc, decoder_input_ids)
        self.engine.begin_batch(enc["attention_mask"], table, decoder_input_ids, enc["input_ids"][:, 0])

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

    def pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(x) for x in ids)
        pad = self.model.config.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=self.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=self.device)
        return {"input_ids": input_ids, "attention_mask": mask}

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize and pad; inputs over `max_input_tokens` are cut (keeping the eos), as the CLI documents."""
        limit = self.max_input_tokens
        return self.pad([x if len(x) <= limit else x[: limit - 1] + x[-1:] for x in self.tokenize(prompts)])

    def classify_prompts(self, prompts: list[str], task: Task) -> list[Classification]:
        """Prompts already in the task's text-to-text format (see server/tasks.py)."""
        return self.classify_ids(self.encode(prompts), task)

    @torch.inference_mode()
    def classify_ids(self, enc: dict[str, torch.Tensor], task: Task, hash_table=None) -> list[Classification]:
        ids = self.label_ids(task)
        rows = enc["input_ids"].shape[0]
        start = self.loaded.decoder_start_ids(rows, self.device)
        self._begin_batch(enc, start, hash_table)
        logits = self.model(**enc, decoder_input_ids=start).logits  # [batch, 1, vocab]
        probs = logits[:, 0, ids].float().softmax(-1).cpu()  # [batch, labels]
        return [
            Classification(task.labels[int(row.argmax())], {w: round(float(p), 6) for w, p in zip(task.labels, row)})
            for row in probs
        ]

    def classify(self, texts: list[str], task: str = "sst2") -> list[Classification]:
        """Raw texts of a single-text task (sst2), formatted by the task's own prompt."""
        t = get_task(task)
        return self.classify_prompts([t.prompt(x) for x in texts], t)

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
        return self.complete_ids(self.encode(prompts), max_new_tokens, temperature, top_p, seed, stops, on_text)

    @torch.inference_mode()
    def complete_ids(
        self,
        enc: dict[str, torch.Tensor],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stops: list[str] | None = None,
        on_text=None,
        hash_table=None,
    ) -> list[Completion]:
        """Generate for a padded batch. `on_text(row, delta)` is called as text appears (streaming);
        generation of a row ends at eos, at a stop string (not included), or after max_new_tokens."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        rows = enc["input_ids"].shape[0]
        self._begin_batch(enc, self.loaded.decoder_start_ids(rows, self.device), hash_table)
        eos = self.model.config.eos_token_id
        stops = stops or []
        texts = [""] * rows
        stopped = [False] * rows
        tokenizer = self.tokenizer

        class Watch(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
                for r, row in enumerate(input_ids[:, 1:].tolist()):
                    if stopped[r]:
                        done[r] = True
                        continue
                    ended = eos in row
                    text = tokenizer.decode(row[: row.index(eos)] if ended else row, skip_special_tokens=True)
                    cut = min((text.find(s) for s in stops if s in text), default=-1)
                    if cut >= 0:
                        text, stopped[r], done[r] = text[:cut], True, True
                    if on_text is not None and text.startswith(texts[r]) and len(text) > len(texts[r]):
                        on_text(r, text[len(texts[r]) :])
                    if text.startswith(texts[r]):
                        texts[r] = text
                    done[r] |= ended
                return done

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
            stopping_criteria=StoppingCriteriaList([Watch()]),
        )  # [batch, 1 + generated], starts with decoder_start_token_id
        results = []
        for r, (row, mask) in enumerate(zip(out[:, 1:].tolist(), enc["attention_mask"])):
            finished = eos in row  # after eos, generate pads the row
            tokens = row[: row.index(eos)] if finished else row
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if stopped[r]:
                text = texts[r]
            reason = "stop" if finished or stopped[r] else "length"
            results.append(Completion(text, int(mask.sum()), len(tokens), reason))
        return results
