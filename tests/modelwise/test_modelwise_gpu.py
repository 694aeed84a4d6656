"""Test-time adaptation on CUDA gives the CPU result (same data order, same Adam steps, float rounding apart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_fusion

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["layer_wise_adamerging", "weight_ensembling_moe"])
def test_adaptation_on_cuda_matches_cpu(cls_pool: Path, tmp_path: Path, method: str) -> None:
    for device in ("cpu", "cuda"):
        hf_fusion.merge(
            pool=str(cls_pool / "pool.yaml"),
            method=method,
            output=tmp_path / device,
            device=device,
            steps=3,
            lr=0.01,
            batch_size=4,
            show_progress=False,
        )
    cpu, gpu = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "cuda" / "model.safetensors")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-3, atol=1e-4)
    if method == "layer_wise_adamerging":
        a = json.loads((tmp_path / "cpu" / "merging_weights.json").read_text())["coefficients"]
        b = json.loads((tmp_path / "cuda" / "merging_weights.json").read_text())["coefficients"]
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-3, atol=1e-4)
