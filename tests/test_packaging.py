"""The install layout: every package folder is listed in pyproject, mlflow and streamlit stay at their edges."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"core": "loupe.core", "domains": "loupe.domains", "workflows": "loupe.workflows", "apps": "loupe.apps"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _source_files() -> list[Path]:
    return [p for top in MAPPED for p in (ROOT / top).rglob("*.py")]


def test_every_package_folder_is_installed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {
        ".".join([MAPPED[init.relative_to(ROOT).parts[0]], *init.relative_to(ROOT).parts[1:-1]])
        for top in MAPPED
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_torch_pins() -> None:
    deps = _pyproject()["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(("lib", "allowed"), [("mlflow", {"core/tracking.py"}), ("streamlit", None)])
def test_edge_libraries_stay_at_the_edges(lib: str, allowed: set[str] | None) -> None:
    offenders = []
    for p in _source_files():
        rel = p.relative_to(ROOT).as_posix()
        ok = rel in allowed if allowed is not None else rel.startswith("apps/")
        if lib in _imports(p) and not ok:
            offenders.append(rel)
    assert offenders == []


def _unsafe_loads(source: str) -> list[int]:
    """Lines that call a ``load`` with ``weights_only`` other than the literal True."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "load":
            for kw in node.keywords:
                if kw.arg == "weights_only" and not (isinstance(kw.value, ast.Constant) and kw.value.value is True):
                    lines.append(node.lineno)
    return lines


def test_no_unsafe_torch_load() -> None:
    """No call passes ``weights_only=False`` (or a computed value) to a ``load``; the refusal message that tells
    users how to convert a pickle once, elsewhere, may quote it as text."""
    example = "import torch\nsd = torch.load(p, weights_only=False)\nt = load(p, weights_only=flag)\n"
    assert _unsafe_loads(example) == [2, 3]
    assert _unsafe_loads("torch.load(p, map_location='cpu', weights_only=True)\n") == []
    offenders = [f"{p}:{n}" for p in _source_files() for n in _unsafe_loads(p.read_text())]
    assert offenders == []


def test_help_imports_no_heavy_library() -> None:
    """`loupe --help` stays well under a second: it must not import torch, pandas, pydicom or mlflow."""
    import subprocess
    import sys

    code = (
        "import sys; sys.argv = ['loupe', '--help']\n"
        "from loupe.workflows import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'pandas', 'pydicom', 'mlflow', 'pyarrow', 'timm') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out, out[-500:]
    assert "chest X-rays, pathology" not in out  # the CLI advertises only what exists
