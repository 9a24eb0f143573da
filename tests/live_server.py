"""Starting `sida serve` as a child process on a free local port (the HTTP tests and bench scripts use it)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(base: str) -> bool:
    """Whether the server at `base` answers /health/ready with 200 now."""
    try:
        return httpx.get(base + "/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def metric_value(text: str, series: str, default: float = 0.0) -> float:
    """The value of one series (`name` or `name{label="v"}`, written as exposed) in a /metrics text, else
    `default`."""
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else default


def start_serve(flags: list[str], timeout_s: float = 120, **popen) -> tuple[subprocess.Popen, str]:
    """`sida serve FLAGS --port <free>`; returns once /health/ready answers 200 (RuntimeError if it dies)."""
    port = free_port()
    cmd = [sys.executable, "-m", "sida.server.cli", "serve", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, **popen)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready(base):
            return proc, base
        if proc.poll() is not None:
            raise RuntimeError(f"sida serve exited with {proc.returncode}")
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"sida serve was not ready within {timeout_s} s")
