"""`sida eval`: task accuracy of a model over a labelled data file, with per-example predictions.

The prediction file holds only the example index and the predicted label, nothing that depends on mode,
budget or timing, so that `cmp` of two runs' files is the check that they predicted the same.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sida.offload.runner import Runner
from sida.offload.tasks import get_task


@dataclass
class EvalResult:
    """Accuracy of one task over one data file, with each example's predicted label in file order."""

    task: str
    examples: int
    accuracy: float
    seconds: float
    predictions: list[str] = field(repr=False)

    def summary(self) -> dict:
        """The result without the predictions, rounded for a JSON report."""
        return {
            "task": self.task,
            "examples": self.examples,
            "accuracy": round(self.accuracy, 6),
            "seconds": round(self.seconds, 3),
        }


def evaluate(
    runner: Runner, task_name: str, data: str | Path, limit: int | None = None, batch_size: int = 32, progress=True
) -> EvalResult:
    """Classify every labelled example of `data` in length-sorted batches; accuracy against the labels."""
    task = get_task(task_name)
    examples = task.read(data, limit)
    if not examples:
        raise ValueError(f"{data}: no examples")
    if any(e.label is None for e in examples):
        raise ValueError(f"{data}: has no labels (an unlabeled test split?); accuracy needs labelled data")
    # Length-sorted batches pad less; predictions are put back in file order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    predictions: list[str] = [""] * len(examples)
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, c in zip(idx, runner.classify_prompts([examples[i].prompt for i in idx], task)):
            predictions[i] = c.label
        if progress:
            print(f"\r{task.name}: {min(start + batch_size, len(order))}/{len(order)}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    seconds = time.perf_counter() - t0
    correct = sum(p == e.label for p, e in zip(predictions, examples))
    return EvalResult(task.name, len(examples), correct / len(examples), seconds, predictions)


def write_predictions(result: EvalResult, path: str | Path) -> None:
    """One JSON line per example, `{index, prediction}`: comparable across modes with `cmp`."""
    with Path(path).open("w", encoding="utf-8") as f:
        for i, p in enumerate(result.predictions):
            f.write(json.dumps({"index": i, "prediction": p}) + "\n")
