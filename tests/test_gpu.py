"""The CUDA path gives the CPU result: same tensors (up to float rounding), identical DARE masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import reference as ref
import torch

import hf_fusion

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "method, tolerance",
    [("task_arithmetic", 1e-6), ("ties_merging", 1e-6), ("dare_ties_merging", 1e-6), ("slerp", 1e-5)],
)
def test_cuda_matches_cpu(method: str, tolerance: float, tmp_path: Path, pools) -> None:
    base, experts = pools["gpt2"]
    models = [str(experts[0])] if method == "slerp" else [str(e) for e in experts]
    for device in ("cpu", "cuda"):
        hf_fusion.merge(
            models=models,
            base=str(base),
            method=method,
            output=tmp_path / device,
            device=device,
            budget_elements=1000,
            show_progress=False,
        )
    cpu, gpu = ref.load_state(tmp_path / "cpu"), ref.load_state(tmp_path / "cuda")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=tolerance, atol=tolerance)
