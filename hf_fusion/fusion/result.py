"""What a fusion produced."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hf_fusion.hub.push import PushResult
from hf_fusion.recipe import Recipe
from hf_fusion.reports.report import EvaluationReport


@dataclass(frozen=True)
class MergeResult:
    """The output folder, the pinned recipe, and what it took."""

    output: Path
    recipe: Recipe
    files: list[str]
    seconds: float
    fused_tensors: int
    copied_tensors: int
    statistics_passes: int
    output_bytes: int
    push: PushResult | None = None
    evaluation: EvaluationReport | None = None
    evaluation_seconds: float = 0.0
