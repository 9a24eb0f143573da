"""The contracts between offload and the layers above it, as structural types: what the runner and the engine
take from above (a `HashFunction`, a `DecodeStepGuesser`) and what the HTTP server holds (a `ServingRunner`).

The predictor package's `PredictorHash`, `OracleHash` and `DecoderGuess`, and offload's own `Runner`, satisfy them
without naming them; so does any test fake with the same members.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from sida.offload.decode_batch import DecodeBatch
    from sida.offload.engine import OffloadEngine
    from sida.offload.hash_table import HashTable
    from sida.offload.runner import Classification, Completion, Encoded
    from sida.offload.sampling import Sampling
    from sida.offload.tasks import Task


@runtime_checkable
class HashFunction(Protocol):
    """Builds a batch's hash table ahead of its forward: each predicted MoE layer's top-k experts per token."""

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor
    ) -> HashTable:
        """input_ids, attention_mask [batch, seq]; decoder_input_ids [batch, steps] → the batch's table."""
        ...


@runtime_checkable
class DecodeStepGuesser(Protocol):
    """Guesses each decoder MoE layer's experts for a decoder step from the tokens that step reads, so the engine
    can prefetch them (the router still routes)."""

    @property
    def layers(self) -> list[int]:
        """The decoder MoE layers it guesses for."""
        ...

    def keys(self, decoder_input_ids: torch.Tensor, encoder_first: torch.Tensor | None, offset: int) -> torch.Tensor:
        """Lookup keys [batch, steps] for decoder inputs [batch, steps] at decoder position `offset`;
        `encoder_first` [batch]: each row's first input token."""
        ...

    def predict(self, layer: int, keys: torch.Tensor, k: int) -> torch.Tensor:
        """`layer`'s guessed experts [..., k] for `keys` [...], best first."""
        ...

    def to(self, device: torch.device) -> DecodeStepGuesser:
        """The same guesser with its tensors on `device`."""
        ...


@runtime_checkable
class LayerAheadScorer(Protocol):
    """Scores a MoE layer's experts for a decode step one layer ahead (offload/lookahead.py)."""

    def __call__(self, layer: int, previous: torch.Tensor | None, token_emb: torch.Tensor) -> torch.Tensor:
        """logits [tokens, experts] of `layer` from the hidden state entering the previous MoE layer's experts
        [tokens, H] (None for the first MoE layer) and the embeddings of the token before and the token the step
        reads [tokens, 2H]."""
        ...


@runtime_checkable
class ServingRunner(Protocol):
    """What the HTTP server (its routes and workers) uses of the runner: tokenizing and padding, building a
    batch's hash table, running a batch, and the engine whose figures `/info` reports."""

    device: torch.device
    engine: OffloadEngine | None
    decode_batch: DecodeBatch | None  # continuous batching of completions; None: static batches

    @property
    def tasks(self) -> list[str]:
        """The classification tasks the model serves."""
        ...

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, not truncated."""
        ...

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat through the model's chat template (`NoChatTemplate` where it has none)."""
        ...

    def prompt_pieces(self, prompt: str) -> list[tuple[str, int]]:
        """(text, offset) of each of the prompt's tokens."""
        ...

    def pad(self, ids: list[list[int]]) -> Encoded:
        """Padded batch on the runner's device (right-padded for an encoder, left for a decoder-only model)."""
        ...

    def build_hash_table(self, enc: Encoded, decoder_input_ids: torch.Tensor | None = None) -> HashTable | None:
        """The batch's hash table, or None where nothing would use one."""
        ...

    def classify_ids(
        self, enc: Encoded, task: Task, hash_table: HashTable | None = None, shadow: bool = False
    ) -> list[Classification]:
        """Each row's label."""
        ...

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
        """Each row's completion; `on_text(row, delta)` streams text as it appears."""
        ...
