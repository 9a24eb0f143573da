"""Long offline work shows progress on a terminal (what step, how far, how long left) and nothing in a CI log."""

from __future__ import annotations

import io
import sys

from sida.offload.model_loader import load_model
from sida.predictor.cli import tracing_progress
from sida.predictor.traces import collect_traces
from sida.predictor.train import TrainConfig, train
from tests.conftest import TINY_TEXTS


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def trace_and_train(tiny8_dir):
    loaded = load_model(tiny8_dir)
    traces = collect_traces(loaded, TINY_TEXTS * 4, batch_size=8, progress=tracing_progress())
    emb = loaded.adapter.embeddings(loaded.model).weight.detach().float()
    train(traces, emb, 8, TrainConfig(hidden=16, max_epochs=2, batch_size=8), log=lambda m: None)


def test_tracing_and_training_draw_bars_on_a_terminal(tiny8_dir, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    trace_and_train(tiny8_dir)
    shown = sys.stderr.getvalue()
    total = len(TINY_TEXTS * 4)
    assert "tracing: 100%" in shown and f"{total}/{total}" in shown
    assert "epoch 1/2" in shown and "epoch 2/2" in shown and "batch/s" in shown  # the rate, hence the time left


def test_tracing_and_training_write_nothing_where_stderr_is_not_a_terminal(tiny8_dir, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a CI log
    trace_and_train(tiny8_dir)
    assert sys.stderr.getvalue() == ""
