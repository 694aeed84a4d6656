"""Evaluation on a GPU, whole or placed by accelerate, gives the CPU's scores (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest

import hf_fusion
from hf_fusion.catalog import get_pool
from hf_fusion.tasks.base import EvalSettings
from hf_fusion.tasks.evaluate import evaluate_pool

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "placement",
    [
        {"device": "cuda"},
        {"device_map": "auto"},
        {"device_map": "sequential", "max_memory": {0: 200_000, "cpu": 10**9}},
        {"device": "cuda", "mixed_precision": "bf16"},
    ],
    ids=["cuda", "device-map-auto", "gpu-and-cpu", "bf16"],
)
def test_gpu_scores_are_the_cpu_scores(placement: dict, text_pool: Path, tmp_path: Path) -> None:
    fused = tmp_path / "fused"
    hf_fusion.merge(pool=str(text_pool / "pool.yaml"), method="task_arithmetic", output=fused, show_progress=False)
    pool = get_pool(str(text_pool / "pool.yaml"))
    common = {"batch_size": 5, "metrics": "bundled", "score_cache": False}
    cpu = evaluate_pool(pool, {"fused": fused}, settings=EvalSettings(**common), show_progress=False)
    gpu = evaluate_pool(pool, {"fused": fused}, settings=EvalSettings(**common, **placement), show_progress=False)
    tolerance = 0.15 if placement.get("mixed_precision") else 1e-9
    for on_cpu, on_gpu in zip(cpu.results, gpu.results):
        for label, value in on_cpu.scores.items():
            assert on_gpu.scores[label] == pytest.approx(value, abs=tolerance), (on_cpu.task, label)
