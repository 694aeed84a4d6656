"""The README and the docs pages: generated tables match the code, the set-up and the example run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fusion.cli import methods_markdown
from hf_fusion.registry import all_methods

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
METHODS_PAGE = ROOT / "docs" / "methods.md"


def test_methods_table_matches_the_registry() -> None:
    text = METHODS_PAGE.read_text()
    match = re.search(r"<!-- methods-table:.*?-->\n(.*?)\n<!-- /methods-table -->", text, re.S)
    assert match, "docs/methods.md lost its methods table markers"
    assert match.group(1) == methods_markdown(all_methods()), "regenerate with `hf-fusion methods --markdown`"


TEST_COMMAND = 'pip install -c constraints.txt -e ".[dev]" && python -m pytest'


def _code_blocks(section: str) -> list[str]:
    """The fenced blocks of one README section (from its heading to the next heading of any level)."""
    blocks: list[str] = []
    inside, fence = False, None
    for line in README.read_text().splitlines():
        if fence is None and line.startswith("#"):
            inside = line.lstrip("#").strip() == section
        elif line.startswith("```"):
            if fence is None:
                fence = []
            else:
                if inside:
                    blocks.append("\n".join(fence) + "\n")
                fence = None
        elif fence is not None:
            fence.append(line)
    return blocks


def test_readme_test_command_is_the_ci_command() -> None:
    install, tests = _code_blocks("Set up")
    assert tests.strip() == TEST_COMMAND
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().endswith(TEST_COMMAND)  # CI runs the README's command as its last step
    assert "python3 -m venv" in install and 'pip install -c constraints.txt ".[demo]"' in install
    assert "HF_HUB_OFFLINE=1 hf-fusion merge --pool minilm-text3" in install


@pytest.mark.slow
def test_python_example_runs_as_written(tmp_path: Path) -> None:
    (code,) = _code_blocks("From Python")
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "again" / "model.safetensors").is_file()
