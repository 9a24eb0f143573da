"""Readers of the unlabelled text in the shared data folder (the C4 sample, MultiRC passages, WikiText) and of
model inputs from any supported file: what router traces, the predictor's training and `sida eval` read."""

from __future__ import annotations

import json
from pathlib import Path

from sida.offload.tasks import TASKS, multirc_passages


def read_c4_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Documents of the C4 sample (JSON lines with a 'text' key), for the completion objective."""
    texts = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if limit is not None and len(texts) >= limit:
                break
    return texts


def read_multirc_passages(path: str | Path) -> list[str]:
    """The passages of a MultiRC jsonl file, as plain text (for the completion objective)."""
    return [text for text, _ in multirc_passages(Path(path))]


def read_wikitext_paragraphs(path: str | Path, limit: int) -> list[str]:
    """The first `limit` WikiText paragraphs of more than 40 words (headings skipped): prefix → continuation
    text for measuring decoder routing on text the demo model is not trained on."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if len(ln.split()) > 40 and not ln.startswith("=")][:limit]


def read_inputs(path: str | Path, limit: int | None = None) -> list[str]:
    """Model inputs from any supported file (the first `limit`): SST-2/MRPC tsv or MultiRC jsonl as task
    prompts, C4 jsonl as raw text, or a plain text file with one input per line (WikiText headings and blank
    lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix == ".tsv":
        header = _first_line(path, "utf-8-sig")
        task = "mrpc" if "#1 String" in header else "sst2"
        return [e.prompt for e in TASKS[task].read(path, limit)]
    if path.suffix == ".jsonl":
        first = json.loads(_first_line(path, "utf-8"))
        if "passage" in first:
            return [e.prompt for e in TASKS["multirc"].read(path, limit)]
        return read_c4_texts(path, limit)
    lines = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("= "):
                lines.append(line)
                if limit is not None and len(lines) >= limit:
                    break
    return lines


def _first_line(path: Path, encoding: str) -> str:
    """The file's first line, the file closed again."""
    with path.open(encoding=encoding) as f:
        return f.readline()


def beginnings(texts: list[str], words: int = 12) -> list[str]:
    """The first `words` words of each text that has that many, as prompts to continue."""
    return [" ".join(t.split()[:words]) for t in texts if len(t.split()) >= words]
