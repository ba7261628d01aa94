"""The directory structure is the architecture: imports flow analysis → study → trainables."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"trainables": {"study", "analysis"}, "study": {"analysis"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package):
    bad = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & FORBIDDEN[package])
           for p in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_ray_is_imported_in_one_trainables_module_only():
    users = sorted(p.name for p in (ROOT / "trainables").rglob("*.py") if "ray" in imported_packages(p))
    assert users == ["ray_trainable.py"]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(__file__).resolve().parents[2] / ".venv/bin/ruff")
    out = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
