"""Fused architectures that are not stock transformers classes carry their modeling code: stock transformers loads
them with ``trust_remote_code=True`` in a process that cannot import hf-fusion, and gets the same outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

import hf_fusion
import hf_fusion.models  # noqa: F401  (registers the fused architectures with the Auto classes)
from hf_fusion.cards import write_card
from hf_fusion.model_files import output_file_patterns

PACKAGE = Path(hf_fusion.models.__file__).parent

# Runs in a fresh interpreter: every path that holds hf_fusion is dropped from sys.path and any import of it fails,
# so only stock transformers, torch and the folder's own files are available.
LOADER = textwrap.dedent(
    """
    import importlib.abc, json, os, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_fusion" or name.startswith("hf_fusion."):
                raise ImportError("hf_fusion must not be imported here")
            return None

    sys.meta_path.insert(0, Refuse())
    sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "hf_fusion"))]
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    import torch

    folder, inputs_file, outputs_file = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(**load_file(inputs_file))
    save_file({"last_hidden_state": out.last_hidden_state.contiguous()}, outputs_file)
    print(json.dumps({"class": type(model).__name__, "module": type(model).__module__,
                      "hf_fusion_loaded": any(m.startswith("hf_fusion") for m in sys.modules)}))
    """
)


def _load_without_hf_fusion(
    folder: Path | str, inputs: dict[str, torch.Tensor], tmp_path: Path
) -> tuple[dict, torch.Tensor]:
    save_file(inputs, tmp_path / "inputs.safetensors")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.st")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), load_file(tmp_path / "out.st")["last_hidden_state"]


@pytest.mark.parametrize(
    "method,params",
    [
        ("simple_ensemble", {}),
        ("weight_ensembling_moe", {"steps": 2, "batch_size": 4}),
        ("smile_upscaling", {"k": 4, "gate_k": 2, "top_k": 2}),
    ],
)
def test_fused_architecture_loads_without_hf_fusion(cls_pool: Path, tmp_path: Path, method: str, params: dict) -> None:
    out = tmp_path / method
    result = hf_fusion.merge(pool=str(cls_pool / "pool.yaml"), method=method, output=out, show_progress=False, **params)
    config = json.loads((out / "config.json").read_text())
    module = config["auto_map"]["AutoModel"].split(".")[0]
    shipped = {f"{module}.py", "members.py"}
    assert shipped <= set(result.files)
    for name in shipped:  # the package's own source, byte for byte, importing nothing of hf-fusion
        assert (out / name).read_bytes() == (PACKAGE / name).read_bytes()
        assert "hf_fusion" not in (out / name).read_text().replace("hf_fusion_", "")
    patterns = output_file_patterns()
    assert all(name in patterns for name in shipped)  # a push uploads them

    tokenizer = AutoTokenizer.from_pretrained(cls_pool / "base")
    inputs = dict(tokenizer(["good movie review", "bad plot"], padding=True, return_tensors="pt"))
    local = AutoModel.from_pretrained(out).eval()  # hf-fusion imported: registered classes, no remote code
    assert type(local).__module__.startswith("hf_fusion.models")
    with torch.no_grad():
        expected = local(**inputs).last_hidden_state
    seen, remote = _load_without_hf_fusion(out, inputs, tmp_path)
    assert seen["class"] == type(local).__name__ and not seen["hf_fusion_loaded"]
    assert seen["module"].startswith("transformers_modules")
    torch.testing.assert_close(remote, expected, atol=1e-6, rtol=1e-5)

    card = write_card(out).read_text()
    assert "trust_remote_code=True" in card and "import hf_fusion.models" in card


def test_stock_architectures_ship_no_code(cls_pool: Path, tmp_path: Path) -> None:
    result = hf_fusion.merge(
        pool=str(cls_pool / "pool.yaml"), method="task_arithmetic", output=tmp_path / "ta", show_progress=False
    )
    assert not [f for f in result.files if f.endswith(".py")]
    assert "auto_map" not in json.loads((tmp_path / "ta" / "config.json").read_text())


def test_pushed_ensemble_loads_from_the_hub_without_hf_fusion(
    cls_pool: Path, hub, tokens, repo_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repo a push makes holds the modeling files too: stock transformers loads it by repo id."""
    out = tmp_path / "ensemble"
    hf_fusion.merge(
        pool=str(cls_pool / "pool.yaml"),
        method="simple_ensemble",
        output=out,
        push=repo_name,
        token=tokens["write"],
        show_progress=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(cls_pool / "base")
    inputs = dict(tokenizer(["good movie review"], return_tensors="pt"))
    with torch.no_grad():
        expected = AutoModel.from_pretrained(out).eval()(**inputs).last_hidden_state
    monkeypatch.setenv("HF_TOKEN", tokens["read"])  # the child reads the loopback Hub (HF_ENDPOINT) with it
    seen, remote = _load_without_hf_fusion(repo_name, inputs, tmp_path)
    assert seen["class"] == "FusedEnsembleModel" and not seen["hf_fusion_loaded"]
    torch.testing.assert_close(remote, expected, atol=1e-6, rtol=1e-5)
