"""The `sida` command as a user runs it: a real subprocess on the shipped demo model."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # a real `sida` process per test


def sida(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "sida.server.cli", *args], capture_output=True, text=True, cwd=REPO, **kw
    )


def test_classify(demo_dir):
    r = sida("classify", "--json", "a gorgeous , witty , seductive movie .", "a dull , lifeless , boring mess .")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["label"] for row in rows] == ["positive", "negative"]
    assert abs(sum(rows[0]["probs"].values()) - 1) < 1e-4


def test_complete(demo_dir):
    r = sida("complete", "--json", "--max-tokens", "8", "the city council voted on tuesday to")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["completion"].strip() and row["finish_reason"] in ("stop", "length")


def test_eval_json_and_predictions(demo_dir, data_dir, tmp_path):
    out = tmp_path / "pred.jsonl"
    r = sida(
        "eval",
        "--task",
        "sst2",
        "--data",
        str(data_dir / "sst2" / "dev.tsv"),
        "--limit",
        "40",
        "--json",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["task"] == "sst2" and summary["examples"] == 40 and 0 <= summary["accuracy"] <= 1
    assert "40/40" in r.stderr  # progress goes to stderr, not stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(x) for x in lines] == [{"index", "prediction"}] * 40
    assert [x["index"] for x in lines] == list(range(40))
    # same inputs → byte-identical prediction files
    out2 = tmp_path / "pred2.jsonl"
    sida(
        "eval",
        "--task",
        "sst2",
        "--data",
        str(data_dir / "sst2" / "dev.tsv"),
        "--limit",
        "40",
        "--out",
        str(out2),
        "--batch-size",
        "7",
    )
    assert out.read_bytes() == out2.read_bytes()


def test_eval_refuses_unlabeled_data(demo_dir, data_dir):
    r = sida("eval", "--task", "sst2", "--data", str(data_dir / "sst2" / "test.tsv"), "--limit", "5")
    assert r.returncode == 2 and "has no labels" in r.stderr and "Traceback" not in r.stderr


def test_config_prints_resolved_settings(demo_dir):
    r = sida("config", "--torch-threads", "2")
    assert r.returncode == 0 and "\ntorch_threads: 2\n" in r.stdout and "\nhash_torch_threads: null\n" in r.stdout


def test_predictor_eval_reports_encoder_and_decoder_figures_apart(demo_dir, data_dir):
    r = sida(
        "predictor",
        "eval",
        "--model",
        str(demo_dir),
        "--data",
        str(data_dir / "sst2" / "dev.tsv"),
        "--limit",
        "40",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert 0 < out["top1_hit_rate"] <= out["top3_hit_rate"] <= 1 and set(out["per_layer"]) == {"0", "1"}
    first = out["decoder"]["first_step"]
    assert set(first) == {"2", "3"} and all(v["tokens"] == 40 and v["top1"] <= v["top3"] for v in first.values())
    assert out["predictor_ms"] > 0 and out["model_ms"] > 0


def test_build_demo_hands_its_options_to_the_builder_and_other_commands_refuse_unknown_ones(monkeypatch, capsys):
    from sida.demo_model import build
    from sida.server import cli

    seen: list[list[str]] = []
    monkeypatch.setattr(build, "main", seen.append)
    argv = ["--stage", "lm", "--out", "some/model", "--epochs", "3"]
    cli.main(["build-demo", *argv])
    assert seen == [argv]
    with pytest.raises(SystemExit) as e:
        cli.main(["classify", "--bogus", "1", "a film"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_eval_reports_decode_recall_of_a_decoder_only_model(data_dir):
    olmoe = REPO / "models" / "sida-olmoe-demo"
    args = ["--model", str(olmoe), "--task", "sst2", "--data", str(data_dir / "sst2" / "dev.tsv"), "--limit", "8"]
    r = sida("eval", *args, "--budget-experts", "16", "--decode-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    recall = json.loads(r.stdout.strip().splitlines()[-1])["decode_recall"]
    assert set(recall) == {"all", "0", "1", "2", "3"} and all(0 <= v <= 1 for v in recall.values())
