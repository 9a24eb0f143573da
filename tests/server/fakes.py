"""A runner without a model for the server tests: every member of the `ServingRunner` contract, each the simplest
thing that works. Tests subclass it to record calls or inject faults; tests/offload/test_contracts.py checks that
it and its subclasses keep the contract's members and parameter names."""

from __future__ import annotations

import re

import torch

from sida.offload.hash_table import HashTable
from sida.offload.runner import Classification, Completion
from sida.offload.tasks import TASKS


class FakeRunner:
    """One token per word; padding with 0; a hash table that marks each row with its first token; classification
    labels each row by its first token's parity; every completion is "a b", streamed as "a", " b"; no engine."""

    device = torch.device("cpu")
    engine = None
    decode_batch = None
    tasks = sorted(TASKS)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [list(range(len(t.split()))) for t in texts]

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize([" ".join(f"{m['role']}: {m['content']}" for m in messages) + " assistant:"])[0]

    def prompt_pieces(self, prompt: str) -> list[tuple[str, int]]:
        return [(m.group(), m.start()) for m in re.finditer(r"\s*\S+", prompt)]

    def pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(x) for x in ids)
        return {
            "input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        }

    def build_hash_table(self, enc, decoder_input_ids=None) -> HashTable:
        first = enc["input_ids"][:, :1, None].expand(-1, enc["input_ids"].shape[1], 1)  # [batch, seq, 1]
        return HashTable({0: first.clone()}, {0: torch.ones(first.shape[:2])})

    def classify_ids(self, enc, task, hash_table=None, shadow=False) -> list[Classification]:
        return [Classification(task.labels[x % 2], {}) for x in enc["input_ids"][:, 0].tolist()]

    def complete_ids(
        self,
        enc,
        max_new_tokens=32,
        sampling=None,
        seeds=None,
        stops=None,
        on_text=None,
        hash_table=None,
        shadow=False,
        ignore_eos=False,
    ) -> list[Completion]:
        out = []
        for row, mask in enumerate(enc["attention_mask"].tolist()):
            for delta in ("a", " b"):
                if on_text is not None:
                    on_text(row, delta)
            out.append(Completion("a b", sum(mask), 2, "length"))
        return out
