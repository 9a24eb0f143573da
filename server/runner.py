"""Classification and completion over a loaded model: what `sida classify|complete|eval` (and later the server) run.

Classification is text-to-text: the label is the task's label word with the highest first-decoder-step
logit, so every label costs one decoder step and comes with a probability over the label set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.model_loader import LoadedModel
from server.tasks import Task, get_task, sst2_prompt


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

    def _begin_batch(self, enc: dict[str, torch.Tensor], decoder_input_ids: torch.Tensor) -> None:
        if self.engine is None:
            return
        table = self.hash_fn(enc["input_ids"], enc["attention_mask"], decoder_input_ids) if self.hash_fn else None
        self.engine.begin_batch(enc["attention_mask"], table)

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

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_input_tokens, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    @torch.inference_mode()
    def classify_prompts(self, prompts: list[str], task: Task) -> list[Classification]:
        """Prompts already in the task's text-to-text format (see server/tasks.py)."""
        ids = self.label_ids(task)
        enc = self.encode(prompts)
        start = torch.full((len(prompts), 1), self.model.config.decoder_start_token_id, device=self.device)
        self._begin_batch(enc, start)
        logits = self.model(**enc, decoder_input_ids=start).logits  # [batch, 1, vocab]
        probs = logits[:, 0, ids].float().softmax(-1).cpu()  # [batch, labels]
        return [
            Classification(task.labels[int(row.argmax())], {w: round(float(p), 6) for w, p in zip(task.labels, row)})
            for row in probs
        ]

    def classify(self, texts: list[str], task: str = "sst2") -> list[Classification]:
        """Raw sentences; only single-sentence tasks can be asked this way (sst2)."""
        if task != "sst2":
            raise ValueError(f"classify takes raw text for task 'sst2' only, not {task!r}")
        return self.classify_prompts([sst2_prompt(t) for t in texts], get_task(task))

    @torch.inference_mode()
    def complete(
        self,
        prompts: list[str],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Completion]:
        enc = self.encode(prompts)
        self._begin_batch(
            enc, torch.full((len(prompts), 1), self.model.config.decoder_start_token_id, device=self.device)
        )
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
        )  # [batch, 1 + generated], starts with decoder_start_token_id
        eos = self.model.config.eos_token_id
        results = []
        for row, mask in zip(out[:, 1:].tolist(), enc["attention_mask"]):
            finished = eos in row  # after eos, generate pads the row
            tokens = row[: row.index(eos)] if finished else row
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(Completion(text, int(mask.sum()), len(tokens), "stop" if finished else "length"))
        return results
