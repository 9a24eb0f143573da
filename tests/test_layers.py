"""The package layers point one way (offload ← predictor ← server), product code never imports bench/ or
tests/, the daemon never loads the offline demo-model builder, and modules and functions stay readable."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("offload", "predictor", "demo_model", "server")  # folder = package sida.<folder>, lowest layer first
ALLOWED = {
    "offload": {"offload"},
    "predictor": {"offload", "predictor"},
    "demo_model": {"offload", "predictor", "demo_model"},  # the offline demo-model builder
    "server": {"offload", "predictor", "server"},
}
# imported only inside a function, never at module level: `sida build-demo` loads the offline builder on demand
LAZY_ONLY = {("server", "demo_model")}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
# functions allowed to be longer, with the reason
LONG_FUNCTIONS: dict[str, str] = {}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["sida", *parts])


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute names an import statement brings in."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level == 0:
        return [node.module or ""]
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return [".".join(base + ([node.module] if node.module else []))]


def _layer(name: str) -> str | None:
    """The package of ours an absolute module name belongs to ('bench'/'tests' included), else None."""
    parts = name.split(".")
    if parts[0] == "sida" and len(parts) > 1:
        return parts[1]
    if parts[0] in (*PACKAGES, "bench", "tests"):
        return parts[0]  # a bare `server`/`offload` import: there is no such installed package
    return None


def _local_import_reason(lines: list[str], lineno: int) -> bool:
    """A function-local import carries a one-line reason: a comment on its line or the line above."""
    return "#" in lines[lineno - 1] or lines[lineno - 2].strip().startswith("#")


def violations(root: Path) -> list[str]:
    """Every import under `root/{offload,predictor,server}` that breaks the layers, as 'file:line: message'."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            lines = text.splitlines()
            tree = ast.parse(text, filename=str(path))
            module = _module_name(path, root)
            module_level = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                where = f"{path.relative_to(root)}:{node.lineno}"
                for name in _imported(node, module, path.name == "__init__.py"):
                    target = _layer(name)
                    if target is None:
                        continue
                    nested = id(node) not in module_level
                    lazy_ok = nested and (package, target) in LAZY_ONLY
                    if target not in ALLOWED[package] and not lazy_ok:
                        found.append(f"{where}: sida.{package} imports {name} (a higher layer or a non-product tree)")
                    elif name.split(".")[0] != "sida":
                        found.append(f"{where}: import {name} must be written sida.{name}")
                nested = id(node) not in module_level and not _in_type_checking(tree, node)
                if nested and not _local_import_reason(lines, node.lineno):
                    found.append(f"{where}: function-local import without a one-line reason comment")
    return found


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for top in tree.body:
        if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test):
            if any(n is node for n in ast.walk(top)):
                return True
    return False


def test_layers_point_one_way():
    assert violations(REPO) == []


def test_a_back_edge_is_caught_with_its_file_and_line(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "offload" / "engine.py").write_text("import torch\n\nfrom sida.server.metrics import Metrics\n")
    (tmp_path / "predictor" / "cli.py").write_text(
        "def run():\n    from sida.server import runner\n    from bench import offload_bench  # reason\n"
    )
    (tmp_path / "server" / "app.py").write_text("from ..predictor import network\nfrom server.x import y\n")
    (tmp_path / "server" / "cli.py").write_text(
        "from sida.demo_model import build\n\n\ndef run():\n    from sida.demo_model import card  # offline\n"
    )
    (tmp_path / "demo_model" / "stages.py").write_text("from sida.server.settings import Settings\n")
    found = violations(tmp_path)
    assert "offload/engine.py:3: sida.offload imports sida.server.metrics" in found[0]
    assert any(f.startswith("predictor/cli.py:2: sida.predictor imports sida.server") for f in found)
    assert any(f.startswith("predictor/cli.py:2: function-local import without") for f in found)
    assert any(f.startswith("predictor/cli.py:3: sida.predictor imports bench") for f in found)
    assert any(f.startswith("server/app.py:2: import server.x must be written sida.server.x") for f in found)
    assert not any(f.startswith("server/app.py:1") for f in found)  # sida.predictor from server: allowed
    assert any(f.startswith("server/cli.py:1: sida.server imports sida.demo_model") for f in found)
    assert not any(f.startswith("server/cli.py:5") for f in found)  # the builder, loaded on demand: allowed
    assert any(f.startswith("demo_model/stages.py:1: sida.demo_model imports sida.server") for f in found)


def test_the_daemon_never_loads_the_demo_model_builder_or_bench():
    code = (
        "import sys, sida.server.cli, sida.server.app; "
        "print([m for m in sys.modules if m.startswith(('sida.demo_model.', 'bench', 'tests'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def test_modules_and_functions_stay_readable():
    long_files, long_functions = [], []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            rel = path.relative_to(REPO)
            if len(text.splitlines()) > MAX_FILE_LINES:
                long_files.append(f"{rel}: {len(text.splitlines())} lines")
            for name, node in _functions(ast.parse(text)):
                span = node.end_lineno - node.lineno + 1
                if span > MAX_FUNCTION_LINES and f"{rel}:{name}" not in LONG_FUNCTIONS:
                    long_functions.append(f"{rel}:{name} {span} lines")
    assert long_files == []
    assert long_functions == []
