"""The texts the load test sends, read from the shared data folder: SST-2 sentences and MRPC sentence pairs to
classify, and WikiText sentence beginnings to complete.

Plain Python (neither locust nor sida), so that the load test runs from any machine that has locust and a copy of
the data folder.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path

SST2 = "sst2/dev.tsv"
MRPC = "mrpc/dev.tsv"
WIKITEXT = "wikitext2/wiki.valid.tokens"
_JOINS = re.compile(r" @(.)@ ")  # WikiText's tokenized "60 @-@ year" for "60-year" (also @,@ and @.@)


@dataclass(frozen=True)
class Inputs:
    """What each kind of call draws from."""

    sentences: list[str]  # SST-2: one text per input
    pairs: list[tuple[str, str]]  # MRPC: sentence1, sentence2
    prompts: list[str]  # WikiText: the first words of a sentence


def _file(data: Path, name: str) -> Path:
    path = data / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point --sida-data (SIDA_LOADTEST_DATA) at the shared data folder")
    return path


def _tsv(path: Path) -> list[dict[str, str]]:
    # utf-8-sig: the MRPC header starts with a BOM; QUOTE_NONE: sentences contain bare quotes.
    with path.open(encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def sst2_sentences(data: Path) -> list[str]:
    """The sentences of SST-2 dev."""
    return [r["sentence"].strip() for r in _tsv(_file(data, SST2)) if r["sentence"].strip()]


def mrpc_pairs(data: Path) -> list[tuple[str, str]]:
    """The sentence pairs of MRPC dev."""
    return [(r["#1 String"].strip(), r["#2 String"].strip()) for r in _tsv(_file(data, MRPC))]


def wikitext_prompts(data: Path, words: tuple[int, int] = (6, 20), seed: int = 0) -> list[str]:
    """The first 6 to 20 words (drawn with `seed`) of each WikiText valid sentence that has that many and no
    `<unk>`; headings skipped, WikiText's split hyphens and number separators joined again."""
    rng = random.Random(seed)
    prompts = []
    for line in _file(data, WIKITEXT).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in _JOINS.sub(r"\1", line).split(" . "):
            tokens = sentence.split()
            if len(tokens) >= words[1] and "<unk>" not in sentence:
                prompts.append(" ".join(tokens[: rng.randint(*words)]))
    return prompts


def read_inputs(data: Path) -> Inputs:
    """Every input the load test may send (FileNotFoundError naming the option if a file is missing)."""
    data = Path(data)
    return Inputs(sst2_sentences(data), mrpc_pairs(data), wikitext_prompts(data))
