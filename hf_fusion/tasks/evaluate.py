"""Score fused models on the tasks of their pool, beside the pretrained base and each task's own expert."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_fusion.catalog import Pool, TaskSpec
from hf_fusion.engine.lora import is_lora_adapter
from hf_fusion.errors import RecipeError
from hf_fusion.progress import progress_bar
from hf_fusion.recipe import ModelRef
from hf_fusion.reports.report import EvaluationReport, TaskResult
from hf_fusion.sources import fetch, resolve
from hf_fusion.tasks.base import EvalSettings, TaskContext, TaskEvaluator
from hf_fusion.tasks.causal_lm import CausalLM
from hf_fusion.tasks.classification import HeadClassification
from hf_fusion.tasks.clip_zero_shot import ClipZeroShot
from hf_fusion.tasks.data import SUBSET_SEED
from hf_fusion.tasks.text_to_text import TextToText
from hf_fusion.tasks.weights import ModelUnderTest

EVALUATORS: dict[str, type[TaskEvaluator]] = {
    "clip_zero_shot": ClipZeroShot,
    "classification": HeadClassification,
    "text_to_text": TextToText,
    "causal_lm": CausalLM,
}
PRETRAINED, INDIVIDUAL = "pretrained", "individual"


@dataclass(frozen=True)
class PoolModels:
    """The pool's base and experts as local folders (Hub models fetched into the cache)."""

    base: Path
    experts: dict[str, ModelUnderTest]


def fetch_pool(
    pool: Pool, tasks: list[TaskSpec], *, token: str | None = None, show_progress: bool = True
) -> PoolModels:
    def local(reference: str) -> Path:
        source = resolve(ModelRef.parse(reference), token=token, allow_pickle=False)
        folder = fetch(source, token=token, show_progress=show_progress).folder
        assert folder is not None
        return folder

    base = local(pool.base)
    experts = {}
    for spec in tasks:
        folder = local(pool.experts[spec.name])
        experts[spec.name] = ModelUnderTest(spec.name, folder, base if is_lora_adapter(folder) else None)
    return PoolModels(base, experts)


def _for_task(fused: Path | Mapping[str, Path], task: str) -> Path:
    if isinstance(fused, Mapping):
        if task not in fused:
            raise RecipeError(f"the fused models hold no model for task {task!r} (they cover {', '.join(fused)}).")
        return fused[task]
    return fused


def _subset_seed(limit: int | None, examples: int) -> int | None:
    """The seed of the sample when ``limit`` cut the split (it then holds exactly ``limit`` examples); a split
    shorter than the limit was scored whole."""
    return SUBSET_SEED if limit is not None and examples >= limit else None


def _score(evaluator: TaskEvaluator, model: ModelUnderTest, task: str, show_progress: bool) -> float:
    """Scores one model with a bar over the task's examples, counted as the evaluator draws its batches, so a long
    evaluation reports progress (or logs it periodically where no bar is drawn)."""
    draw = evaluator.batches
    with progress_bar(
        total=len(evaluator.data),
        desc=f"evaluating {task} ({model.label})",
        unit="example",
        disable=not show_progress,
        leave=False,
    ) as bar:

        def counted() -> Iterator[dict[str, list[Any]]]:
            for batch in draw():
                yield batch
                bar.update(len(next(iter(batch.values()), [])))

        evaluator.batches = counted  # type: ignore[method-assign]
        try:
            return evaluator.score(model)
        finally:
            del evaluator.batches


def evaluate_pool(
    pool: Pool,
    fused: Mapping[str, Path | Mapping[str, Path]],
    *,
    tasks: list[str] | None = None,
    baselines: bool = True,
    settings: EvalSettings = EvalSettings(),
    token: str | None = None,
    show_progress: bool = True,
) -> EvaluationReport:
    """Scores each fused folder (label -> folder) on the pool's tasks, with the pretrained base and, per task, the
    task's own expert (``individual``) when ``baselines``. A label may map to one folder per task (TALL masks,
    EMR-Merging fuse one model per task)."""
    specs = pool.select(tasks)
    models = fetch_pool(pool, specs, token=token, show_progress=show_progress)
    per_task = len(fused) + (2 if baselines else 0)
    results = []
    with progress_bar(total=len(specs) * per_task, desc="evaluating", unit="score", disable=not show_progress) as bar:
        for spec in specs:
            expert = models.experts[spec.name]
            evaluator = EVALUATORS[spec.kind](spec, TaskContext(models.base, expert, tuple(pool.heads)), settings)
            candidates = [
                ModelUnderTest(label, _for_task(folder, spec.name), models.base) for label, folder in fused.items()
            ]
            if baselines:
                candidates += [
                    ModelUnderTest(PRETRAINED, models.base),
                    ModelUnderTest(INDIVIDUAL, expert.folder, expert.base),
                ]
            scores: dict[str, float | None] = {}
            for model in candidates:
                value = _score(evaluator, model, spec.name, show_progress)
                scores[model.label] = None if math.isnan(value) else value
                bar.update(1)
            examples = len(evaluator.data)
            results.append(
                TaskResult(
                    task=spec.name,
                    task_type=spec.task_type,
                    dataset=spec.dataset,
                    dataset_config=spec.config,
                    split=spec.split,
                    metric=spec.metric,
                    scores=scores,
                    metric_source=evaluator.metric_source,
                    examples=examples,
                    subset_seed=_subset_seed(settings.limit, examples),
                )
            )
    first = next(iter(fused), PRETRAINED)
    return EvaluationReport(fused=first, results=results, pool=pool.name, limit=settings.limit)
