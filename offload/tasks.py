"""The text-to-text tasks (SST-2, MRPC, MultiRC): prompt format, label words, and the reader of each task's
labelled tsv/jsonl splits.

A prompt is always made by `Task.prompt`: the demo model is trained on these prompts, and the server, the CLI,
`sida eval` and the benchmarks all format their inputs through it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    """One model input as a prompt, and its label word (None where the split is unlabelled)."""

    prompt: str
    label: str | None


@dataclass(frozen=True)
class Task:
    """A text-to-text task: its label words and the prompt its inputs are written in."""

    name: str
    labels: tuple[str, ...]  # label words, index = dataset label id
    fields: tuple[str, ...]  # the texts of one input, in order (a sentence; a sentence pair; ...)
    template: str  # the prompt, with one {field} per field

    def prompt(self, *texts: str) -> str:
        """The model input for one example's texts, given in the order of `fields`."""
        if len(texts) != len(self.fields) or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                f"task {self.name} takes {len(self.fields)} text(s) per input ({', '.join(self.fields)}), "
                f"got {len(texts)}"
            )
        return self.template.format(**{f: t.strip() for f, t in zip(self.fields, texts)})

    def read(self, path: str | Path, limit: int | None = None) -> list[Example]:
        """The examples of a data file of this task (the first `limit`), prompts made by `prompt`; labels where
        the file has them."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{self.name} data file not found: {path}")
        examples = _READERS[self.name](self, path)
        return examples[:limit] if limit is not None else examples


def _sst2(task: Task, path: Path) -> list[Example]:
    """An SST-2 tsv: a 'sentence' column and, in labelled splits, 'label' (0/1)."""
    rows = _tsv_rows(path)
    if not rows or "sentence" not in rows[0]:
        raise ValueError(f"{path}: expected an SST-2 tsv with a 'sentence' column")
    return [
        Example(task.prompt(r["sentence"]), task.labels[int(r["label"])] if r.get("label") not in (None, "") else None)
        for r in rows
    ]


def _mrpc(task: Task, path: Path) -> list[Example]:
    """An MRPC tsv: '#1 String', '#2 String' and, in labelled splits, 'Quality' (0/1)."""
    rows = _tsv_rows(path)
    if not rows or "#1 String" not in rows[0]:
        raise ValueError(f"{path}: expected an MRPC tsv with '#1 String' and '#2 String' columns")
    return [
        Example(task.prompt(r["#1 String"], r["#2 String"]), task.labels[int(r["Quality"])] if "Quality" in r else None)
        for r in rows
    ]


def multirc_passages(path: Path) -> list[tuple[str, dict]]:
    """(text, record) of each passage of a SuperGLUE MultiRC jsonl file; the text with its `<br>` tags as spaces."""
    passages = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                passage = json.loads(line)["passage"]
                passages.append((passage["text"].replace("<br>", " "), passage))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{line_no}: not a SuperGLUE MultiRC record ({e})") from None
    return passages


def _multirc(task: Task, path: Path) -> list[Example]:
    """SuperGLUE MultiRC jsonl: one example per (question, answer) of each passage."""
    examples = []
    for paragraph, passage in multirc_passages(path):
        for q in passage["questions"]:
            for a in q["answers"]:
                label = task.labels[a["label"]] if "label" in a else None
                examples.append(Example(task.prompt(q["question"], a["text"], paragraph), label))
    return examples


def _tsv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a GLUE tsv as dicts by header column."""
    # utf-8-sig: the MRPC header starts with a BOM; QUOTE_NONE: sentences contain bare quotes.
    with path.open(encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


_READERS = {"sst2": _sst2, "mrpc": _mrpc, "multirc": _multirc}

TASKS: dict[str, Task] = {
    "sst2": Task("sst2", ("negative", "positive"), ("sentence",), "sst2 sentence: {sentence}"),
    "mrpc": Task(
        "mrpc",
        ("not_equivalent", "equivalent"),
        ("sentence1", "sentence2"),
        "mrpc sentence1: {sentence1} sentence2: {sentence2}",
    ),
    "multirc": Task(
        "multirc",
        ("false", "true"),
        ("question", "answer", "paragraph"),
        "multirc question: {question} answer: {answer} paragraph: {paragraph}",
    ),
}

# Every task's label words: the words a classification step chooses among.
LABEL_WORDS: tuple[str, ...] = tuple(word for task in TASKS.values() for word in task.labels)


def get_task(name: str) -> Task:
    """The task named `name`; a clear error naming the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None
