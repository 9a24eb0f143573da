"""A model folder, predictor or expert_dir that cannot be used stops `sida serve` and `sida eval` before they
start: one line on stderr naming the file, exit status 2, no traceback. Each bad folder is a copy of the demo
model with one file damaged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sida.server import cli
from tests.conftest import REPO


def corrupt(path: Path) -> None:
    """Garbage where the safetensors header's JSON starts."""
    with path.open("r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 64)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def other_model(path: Path) -> None:
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "model_fingerprint": "0123456789abcdef"}))


# fault → (file damaged, how, what the error line names)
FAULTS = {
    "weights-corrupt": ("model.safetensors", corrupt, "model.safetensors"),
    "weights-truncated": ("model.safetensors", truncate, "model.safetensors"),
    "tokenizer-missing": ("tokenizer.json", Path.unlink, "tokenizer"),
    "predictor-other-model": ("predictor/predictor.json", other_model, "predictor.json"),
    "predictor-corrupt": ("predictor/predictor.safetensors", corrupt, "predictor.safetensors"),
    "decoder-guess-corrupt": ("predictor/decoder.safetensors", corrupt, "decoder.safetensors"),
    "decoder-guess-truncated": ("predictor/decoder.safetensors", truncate, "decoder.safetensors"),
    "expert-dir-unwritable": (None, None, "expert_dir"),
}


@pytest.fixture(scope="module")
def bad_models(demo_dir, tmp_path_factory) -> dict[str, list[str]]:
    """fault → the flags that point `sida` at it (a damaged copy of the demo model, or a file as expert_dir)."""
    root = tmp_path_factory.mktemp("bad-models")
    flags = {}
    for fault, (name, damage, _) in FAULTS.items():
        if name is None:
            blocker = root / "not-a-folder"
            blocker.write_text("a file where expert_dir should be a folder\n")
            flags[fault] = ["--model", str(demo_dir), "--tier", "disk", "--expert-dir", str(blocker)]
            continue
        folder = root / fault
        shutil.copytree(demo_dir, folder)
        damage(folder / name)
        flags[fault] = ["--model", str(folder)]
    return flags


def command(kind: str, data_dir: Path) -> list[str]:
    if kind == "eval":
        return ["eval", "--task", "sst2", "--data", str(data_dir / "sst2" / "dev.tsv"), "--limit", "4"]
    return ["serve", "--port", "1", "--log-level", "warning"]


def assert_one_line_error(stderr: str, names: str) -> None:
    """The last line of stderr is the one error line (its message does not go on below it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("sida: error: ")]
    assert errors == lines[-1:] and names in errors[0], stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize("kind", ["serve", "eval"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_bad_start_is_one_line_and_status_2(bad_models, data_dir, capsys, monkeypatch, kind, fault):
    """`sida.server.cli.main` in this process; `serve` must fail before it would start uvicorn."""

    def started(self):
        raise AssertionError("sida serve started despite the fault")

    monkeypatch.setattr(cli.GracefulServer, "run", started)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command(kind, data_dir), *bad_models[fault]])
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, FAULTS[fault][2])


@pytest.mark.slow  # a real `sida` process
@pytest.mark.parametrize("kind", ["serve", "eval"])
def test_the_sida_process_exits_2_without_a_traceback(bad_models, data_dir, kind):
    """The same as a user sees it, for one fault: a real `sida` process."""
    cmd = [sys.executable, "-m", "sida.server.cli", *command(kind, data_dir), *bad_models["predictor-corrupt"]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr, "predictor.safetensors")
