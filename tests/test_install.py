"""A non-editable install puts one `sida` package in site-packages, not generic `server`/`predictor`/`offload`."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs a wheel

REPO = Path(__file__).resolve().parent.parent


def test_wheel_installs_under_one_sida_namespace(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("server", "predictor", "offload", "demo_model"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)], check=True
    )
    (wheel,) = (tmp_path / "dist").glob("sida-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True)
    top = {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")} - {"bin"}
    assert top == {"sida"}
    code = (
        "import sys; sys.path[:0] = sys.argv[1:]; "
        "import sida.server.app, sida.server.cli, sida.predictor.network, sida.offload.engine; "
        "print(sida.server.app.__file__)"
    )
    deps = sysconfig.get_paths()["purelib"]
    out = subprocess.run([sys.executable, "-S", "-c", code, str(site), deps], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site / "sida" / "server"))


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "sida.server.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().startswith("sida ")
