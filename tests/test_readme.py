"""The README and docs/: generated tables match the code, set-up and example run as written, links resolve."""

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
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (
        tmp_path / "again" / "model.safetensors"
    ).is_file()


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(path: Path) -> list[str]:
    """The lines of a markdown file outside fenced blocks."""
    lines, fence = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than hyphens and underscores dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(path):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            anchor = _anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            anchors.add(anchor if count == 0 else f"{anchor}-{count}")  # GitHub numbers repeated headings
    return anchors


DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_pages_exist_and_the_readme_links_each() -> None:
    pages = DOCUMENTS[1:]
    assert pages, "docs/ has no pages"
    readme = README.read_text()
    for page in pages:
        assert f"](docs/{page.name})" in readme, f"the README does not link {page.name}"
        assert "](../README.md)" in page.read_text(), f"{page.name} does not link back to the README"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(document: Path) -> None:
    broken = []
    for line in _prose(document):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):  # code spans hold no links
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            if not resolved.exists() or ROOT not in [resolved, *resolved.parents]:
                broken.append(f"{target}: no such file in the repository")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{target}: no heading with this anchor")
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)


def _shown_commands(document: Path) -> list[list[str]]:
    """Every ``hf-fusion ...`` or ``... -m hf_fusion ...`` command in the document's code blocks, continuation lines
    joined, as the arguments hf-fusion receives."""
    import shlex

    blocks = re.findall(r"```[a-z]*\n(.*?)```", document.read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0]
            words = shlex.split(line) if ("hf-fusion " in line or "-m hf_fusion " in line) else []
            if "hf-fusion" in words:
                commands.append(words[words.index("hf-fusion") + 1 :])
            elif "hf_fusion" in words:
                commands.append(words[words.index("hf_fusion") + 1 :])
    return commands


@pytest.mark.parametrize("document", [README, ROOT / "docs" / "scaling.md"], ids=lambda p: p.name)
def test_shown_commands_parse(document: Path) -> None:
    """The commands the README and the scaling page show are accepted by the parser as written (flags, values)."""
    from hf_fusion.cli import build_parser

    commands = [c for c in _shown_commands(document) if not any("[" in w and "--" in w for w in c)]
    assert commands
    for args in commands:
        try:
            build_parser().parse_args(args)
        except SystemExit as err:
            pytest.fail(f"{document.name}: hf-fusion {' '.join(args)} is refused by the parser ({err})")
