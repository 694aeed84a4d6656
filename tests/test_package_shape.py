"""The package's shape: imports flow one way (the import-linter contract in pyproject.toml), and the code is lint-clean
and formatted (ruff, configured in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f'{name} is not installed: pip install -c constraints.txt -e ".[dev]"')
    return found


def test_imports_follow_the_layer_contract() -> None:
    run = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in run.stdout


def test_code_is_lint_clean_and_formatted() -> None:
    ruff = _tool("ruff")
    paths = ["hf_fusion", "tests", "scripts", "spaces"]
    lint = subprocess.run([ruff, "check", "--no-cache", *paths], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert lint.returncode == 0, lint.stdout[-4000:]
    fmt = subprocess.run(
        [ruff, "format", "--check", "--no-cache", *paths], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert fmt.returncode == 0, "run `ruff format`: " + fmt.stdout[-4000:]
