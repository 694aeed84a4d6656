"""Every Usage snippet of a generated card runs as written, in a fresh interpreter, on what its install line names:
a stock merge and an ensemble (whose code ships with it) with transformers and torch only (hf_fusion cannot even be
imported), and a per-task output through ``subfolder=``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hf_fusion

# Run before a snippet that claims to need only transformers and torch: importing hf_fusion then fails.
WITHOUT_HF_FUSION = """
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_fusion" or name.startswith("hf_fusion."):
            raise ImportError(f"{name} is not installed")
sys.meta_path.insert(0, _Refuse())
"""


def usage(card: str) -> tuple[str, list[str]]:
    """The Usage section's text and its Python code blocks, as a reader would copy them."""
    section = card.split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    return section, re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_snippet(code: str, *, hf_fusion_installed: bool, check: str) -> None:
    program = ("" if hf_fusion_installed else WITHOUT_HF_FUSION) + code + "\n" + check
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd="/", env=env, timeout=120)
    assert out.returncode == 0, f"the card's snippet failed:\n{code}\n{out.stderr[-2000:]}"
    assert "ok" in out.stdout


def test_stock_merge_snippet_needs_only_transformers(cls_pool: Path, tmp_path: Path) -> None:
    hf_fusion.merge(
        pool=str(cls_pool / "pool.yaml"), method="task_arithmetic", output=tmp_path / "ta", show_progress=False
    )
    section, blocks = usage((tmp_path / "ta" / "README.md").read_text())
    assert "`pip install transformers torch`" in section and "hf_fusion" not in "".join(blocks)
    assert len(blocks) == 1
    run_snippet(
        blocks[0],
        hf_fusion_installed=False,
        check=(
            "assert type(model).__name__ == 'BertModel' and model.num_parameters() > 0\n"
            "assert tokenizer('good film')['input_ids']\nprint('ok')"
        ),
    )


def test_per_task_snippet_loads_a_subfolder(bert_pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = bert_pool
    hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="tall_masks",
        output=tmp_path / "tall",
        show_progress=False,
    )
    section, blocks = usage((tmp_path / "tall" / "README.md").read_text())
    assert "`pip install transformers torch`" in section
    assert f'subfolder="{experts[0].name}"' in blocks[0]
    run_snippet(
        blocks[0],
        hf_fusion_installed=False,
        check=(
            "import torch\nfrom safetensors.torch import load_file\n"
            f"state = load_file({str(tmp_path / 'tall' / experts[0].name / 'model.safetensors')!r})\n"
            "mine = model.state_dict()\n"
            "assert set(state) <= set(mine) and all(torch.equal(mine[k], v) for k, v in state.items())\nprint('ok')"
        ),
    )


def test_ensemble_snippet_runs_without_hf_fusion(
    cls_pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ensemble's code ships with it: the snippet loads it with trust_remote_code and stock transformers, and
    the text names the way without remote code (hf-fusion installed from its source)."""
    hf_fusion.merge(
        pool=str(cls_pool / "pool.yaml"), method="simple_ensemble", output=tmp_path / "ens", show_progress=False
    )
    card = (tmp_path / "ens" / "README.md").read_text()
    section, blocks = usage(card)
    assert "trust_remote_code=True" in blocks[0] and "hf_fusion" not in blocks[0]
    assert "import hf_fusion.models" in section and "not on PyPI" in section and "pip install ./hf-fusion" in section
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    run_snippet(
        blocks[0],
        hf_fusion_installed=False,
        check=("assert type(model).__name__ == 'FusedEnsembleModel' and len(model.members) == 3\nprint('ok')"),
    )


@pytest.mark.parametrize("folder", ["ta", "ens"])
def test_no_card_claims_a_package_index_serves_hf_fusion(cls_pool: Path, tmp_path: Path, folder: str) -> None:
    method = {"ta": "task_arithmetic", "ens": "simple_ensemble"}[folder]
    hf_fusion.merge(pool=str(cls_pool / "pool.yaml"), method=method, output=tmp_path / folder, show_progress=False)
    card = (tmp_path / folder / "README.md").read_text()
    assert not re.search(r"pip install [\"']?hf-fusion\b", card)
    assert f"hf-fusion {hf_fusion.__version__}, installed from its source" in card.split("## Reproduce", 1)[1]
