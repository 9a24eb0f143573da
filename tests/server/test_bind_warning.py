"""`sida serve` on an address other machines can reach, with no API key: one warning line at start-up (as Jupyter
and ollama give); loopback, or a key, stays quiet. `make run` binds loopback (the Docker image sets its own host)."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest

from sida.server import cli
from sida.server.settings import load_settings
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("host", "api_key", "exposed"),
    [
        ("0.0.0.0", None, True),
        ("::", None, True),
        ("192.168.1.20", None, True),
        ("example.internal", None, True),
        ("", None, True),  # every interface
        ("0.0.0.0", "", True),  # an empty key checks nothing
        ("0.0.0.0", "s3cret", False),
        ("127.0.0.1", None, False),
        ("127.1.2.3", None, False),
        ("::1", None, False),
        ("[::1]", None, False),
        ("localhost", None, False),
        ("LocalHost", None, False),
    ],
)
def test_exposed_without_key(host, api_key, exposed):
    assert cli.exposed_without_key(host, api_key) is exposed


@pytest.fixture
def no_serving(monkeypatch):
    """`cmd_serve` up to the point where it would load the model and listen (single process or Ray): nothing runs."""
    state = SimpleNamespace(failure=None)
    monkeypatch.setattr(cli, "app_from_settings", lambda *a, **k: SimpleNamespace(state=SimpleNamespace(sida=state)))
    monkeypatch.setattr(cli, "uvicorn_config", lambda app, settings: None)
    monkeypatch.setattr(cli.GracefulServer, "__init__", lambda self, *a: None)
    monkeypatch.setattr(cli.GracefulServer, "run", lambda self: None)
    ray_serve = pytest.importorskip("sida.server.ray_serve", reason="Ray Serve is not installed")
    monkeypatch.setattr(ray_serve, "run", lambda *a: None)


@pytest.mark.parametrize(
    ("host", "api_key", "warned"), [("0.0.0.0", None, True), ("127.0.0.1", None, False), ("0.0.0.0", "s3cret", False)]
)
@pytest.mark.parametrize("replicas", [None, 2])  # Ray's proxy binds the same address
def test_serve_warns_once_at_start_up_when_exposed_without_a_key(
    no_serving, caplog, demo_dir, host, api_key, warned, replicas
):
    settings = load_settings(None, model_dir=demo_dir, host=host, port=8123, api_key=api_key, replicas=replicas)
    caplog.set_level(logging.WARNING, logger="sida")
    cli.cmd_serve(SimpleNamespace(hash="auto"), settings)
    lines = [r.getMessage() for r in caplog.records if "no API key" in r.getMessage()]
    if not warned:
        assert lines == []
        return
    assert len(lines) == 1, lines
    assert f"{host}:8123" in lines[0] and "SIDA_API_KEY" in lines[0] and "--host 127.0.0.1" in lines[0], lines
    assert [r.levelno for r in caplog.records if "no API key" in r.getMessage()] == [logging.WARNING]


def test_make_run_binds_loopback_and_the_image_every_interface():
    makefile = (REPO / "Makefile").read_text()
    (run,) = re.findall(r"^run:.*\n\t(.*)", makefile, flags=re.M)
    assert "--host 127.0.0.1" in run, run
    assert "SIDA_HOST=0.0.0.0" in (REPO / "Dockerfile").read_text()  # the container still listens for its port map
