"""Scoring a fused folder on its pool's tasks: the one helper the CLI, ``bench`` and the Space share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_fusion.cards import model_subfolders, write_card
from hf_fusion.fusion.output_folder import output_names
from hf_fusion.recipe import Recipe
from hf_fusion.reports.report import EvaluationReport
from hf_fusion.runtime import Runtime, current
from hf_fusion.tasks.base import EvalSettings


def fused_models(folder: Path, recipe: Recipe, pool: Any) -> Path | dict[str, Path]:
    """The fused folder, or for a method that fuses one model per input, each pool task's own subfolder."""
    if not model_subfolders(folder):
        return folder
    by_path = {ref.path: folder / name for ref, name in zip(recipe.models, output_names(recipe.models))}
    return {task: by_path[path] for task, path in pool.expert_paths().items() if path in by_path}


def evaluate_fused(
    folder: Path,
    recipe: Recipe,
    settings: EvalSettings,
    *,
    tasks: list[str] | None,
    token: str | None,
    show_progress: bool,
    repo_id: str | None,
    runtime: Runtime | None = None,
) -> EvaluationReport:
    """Scores the fused folder on its pool's tasks; the report joins the folder and its card (written by the main
    process of ``runtime``)."""
    from hf_fusion.catalog import get_pool
    from hf_fusion.tasks.evaluate import evaluate_pool

    pool = get_pool(recipe.pool)  # type: ignore[arg-type]
    report = evaluate_pool(
        pool,
        {"fused": fused_models(folder, recipe, pool)},
        tasks=tasks,
        settings=settings,
        token=token,
        show_progress=show_progress,
    )
    if (runtime or current()).is_main:
        report.save(folder)
        write_card(folder, repo_id=repo_id)
    return report
