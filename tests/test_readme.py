"""The README's generated sections match the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

from hf_fusion.cli import methods_markdown
from hf_fusion.registry import all_methods

README = Path(__file__).resolve().parents[1] / "README.md"


def test_methods_table_matches_the_registry() -> None:
    text = README.read_text()
    match = re.search(r"<!-- methods-table:.*?-->\n(.*?)\n<!-- /methods-table -->", text, re.S)
    assert match, "README lost its methods table markers"
    assert match.group(1) == methods_markdown(all_methods()), "regenerate with `hf-fusion methods --markdown`"


def test_readme_set_up_commands_are_the_ci_commands() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt -e ".[dev]"' in README.read_text()
    assert 'pip install -c constraints.txt -e ".[dev]"' in ci
    assert "\npython -m pytest\n" in README.read_text() and ci.rstrip().endswith("python -m pytest")
