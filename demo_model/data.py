"""Training data of the demo model: SST-2 and MRPC as text-to-text pairs, a prefix-LM on the C4 sample, batching.

A pair is (input ids, target ids). Classification targets are [label token, EOS]: the first decoder step's
logits over the label words are the classifier. Completion pairs give the decoder MoE layers multi-token targets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer

from sida.offload.tasks import TASKS, Example
from sida.predictor.corpora import read_c4_texts, read_multirc_passages

from .recipe import DemoRecipe
from .tokenizer import train_tokenizer

Pair = tuple[list[int], list[int]]  # (input ids ending in EOS, target ids)

PAD_ID, EOS_ID = 0, 1
IGNORE = -100  # label value the model's loss skips


@dataclass
class Batch:
    """One padded batch of a single task (or "mixed")."""

    task: str
    input_ids: torch.Tensor  # [batch, seq] padded with PAD_ID
    attention_mask: torch.Tensor  # [batch, seq] 1 on real tokens
    labels: torch.Tensor  # [batch, target] padded with IGNORE


@dataclass
class Prepared:
    """The encoded training data, the held-out SST-2 rows that choose checkpoints, and the run's RNG."""

    tok: Tokenizer
    data: dict[str, list[Pair]]  # task ("sst2", "mrpc", "c4_lm") -> training pairs
    heldout: list[Pair]  # SST-2 train rows kept out of training
    label_ids: list[int]  # token ids of SST-2's label words, in label order
    rng: random.Random  # shuffles training batches; consumed in a fixed order so that a run is reproducible


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    """[len(seqs), longest] long tensor of `seqs`, right-padded with `value`."""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def make_batches(pairs: list[Pair], task: str, size: int, rng: random.Random) -> list[Batch]:
    """Shuffle, then sort by length inside windows of 50 batches: little padding, still random."""
    pairs = pairs[:]
    rng.shuffle(pairs)
    batches = []
    window = size * 50
    for start in range(0, len(pairs), window):
        chunk = sorted(pairs[start : start + window], key=lambda p: len(p[0]))
        for i in range(0, len(chunk), size):
            part = chunk[i : i + size]
            inputs = pad([p[0] for p in part], PAD_ID)
            batches.append(Batch(task, inputs, (inputs != PAD_ID).long(), pad([p[1] for p in part], IGNORE)))
    return batches


def encode_examples(tok: Tokenizer, examples: list[Example], max_len: int) -> list[Pair]:
    """Classification pairs: the prompt (cut to `max_len` tokens, EOS kept last) -> [label token, EOS]."""
    out = []
    for e, x in zip(examples, tok.encode_batch([e.prompt for e in examples])):
        ids = x.ids[: max_len - 1] + [EOS_ID] if len(x.ids) > max_len else x.ids
        out.append((ids, [tok.token_to_id(e.label), EOS_ID]))
    return out


def lm_pairs(
    tok: Tokenizer, texts: list[str], recipe: DemoRecipe, rng: random.Random, prefix: tuple[int, int] | None = None
) -> list[Pair]:
    """Prefix-LM: a random-length prefix (`prefix`, default `recipe.lm_prefix`, in tokens) of a document window
    -> the next `lm_target` tokens."""
    pairs = []
    lo, hi = prefix or recipe.lm_prefix
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids
        pos = 0
        while pos + lo + recipe.lm_target <= len(ids):
            n = rng.randint(lo, hi)
            prefix = ids[pos : pos + n]
            target = ids[pos + n : pos + n + recipe.lm_target]
            if len(target) < 4:
                break
            pairs.append((prefix + [EOS_ID], target))
            pos += n + len(target)
    return pairs


def prepare(data_dir: Path, recipe: DemoRecipe, tok: Tokenizer | None = None) -> Prepared:
    """Read and encode the training data from `data_dir`; with no tokenizer given, train one on it."""
    rng = random.Random(recipe.seed)
    sst2 = TASKS["sst2"].read(data_dir / "sst2" / "train.tsv")
    mrpc = TASKS["mrpc"].read(data_dir / "mrpc" / "train.tsv")
    c4 = read_c4_texts(data_dir / "c4_sample" / "c4_sample.jsonl")
    rng.shuffle(sst2)
    heldout, sst2 = sst2[: recipe.heldout], sst2[recipe.heldout :]
    if tok is None:
        tok = train_tokenizer([e.prompt for e in sst2 + mrpc] + c4, recipe.vocab_size)
    data = {
        "sst2": encode_examples(tok, sst2, recipe.max_input_tokens),
        "mrpc": encode_examples(tok, mrpc, recipe.max_input_tokens),
        "c4_lm": lm_pairs(tok, c4, recipe, rng),
    }
    heldout_pairs = encode_examples(tok, heldout, recipe.max_input_tokens)
    label_ids = [tok.token_to_id(w) for w in TASKS["sst2"].labels]
    return Prepared(tok, data, heldout_pairs, label_ids, rng)


def prepare_lm(prep: Prepared, data_dir: Path, recipe: DemoRecipe) -> tuple[Prepared, list[Pair]]:
    """Stage 5's data from stage 1's: prefix-LM pairs cut `lm_passes` times from C4 (less its last
    `lm_heldout_docs` documents) and the MultiRC train passages, `lm_sst2_rows` SST-2 rows and MRPC; and the
    held-out C4 documents' pairs that choose the checkpoint."""
    c4 = read_c4_texts(data_dir / "c4_sample" / "c4_sample.jsonl")
    train_texts = c4[: -recipe.lm_heldout_docs] + read_multirc_passages(data_dir / "multirc" / "train.jsonl")
    lm = [
        p
        for _ in range(recipe.lm_passes)
        for p in lm_pairs(prep.tok, train_texts, recipe, prep.rng, recipe.lm_short_prefix)
    ]
    heldout = lm_pairs(
        prep.tok, c4[-recipe.lm_heldout_docs :], recipe, random.Random(recipe.seed), recipe.lm_short_prefix
    )
    data = {"c4_lm": lm, "sst2": prep.data["sst2"][: recipe.lm_sst2_rows], "mrpc": prep.data["mrpc"]}
    return replace(prep, data=data), heldout
