"""Score fused models on the tasks of their pool, beside the pretrained base and each task's own expert."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hf_fusion.catalog import Pool, TaskSpec
from hf_fusion.engine.lora import is_lora_adapter
from hf_fusion.errors import RecipeError
from hf_fusion.progress import progress_bar
from hf_fusion.recipe import ModelRef
from hf_fusion.reports.report import EvaluationReport, TaskResult
from hf_fusion.runtime import LOCAL, Runtime, current
from hf_fusion.sources import fetch, resolve
from hf_fusion.tasks.base import EvalSettings, TaskContext, TaskEvaluator
from hf_fusion.tasks.causal_lm import CausalLM
from hf_fusion.tasks.classification import HeadClassification
from hf_fusion.tasks.clip_zero_shot import ClipZeroShot
from hf_fusion.tasks.data import SUBSET_SEED
from hf_fusion.tasks.score_cache import CachedScore, ScoreCache
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


def _score(
    evaluator: TaskEvaluator, model: ModelUnderTest, task: str, runtime: Runtime, show_progress: bool
) -> float | None:
    """Scores one model with a bar over this process's examples (or a periodic log line where no bar is drawn)."""
    with progress_bar(
        total=sum(len(indices) for indices in runtime.mine(evaluator.batch_plan)),
        desc=f"evaluating {task} ({model.label})",
        unit="example",
        disable=not show_progress,
        leave=False,
    ) as bar:
        value = evaluator.score(model, runtime=runtime, on_batch=bar.update)
    return None if math.isnan(value) else value


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
    EMR-Merging fuse one model per task).

    Under several processes (``accelerate launch``, ``torchrun``) each task's batches are shared out and the
    predictions gathered, unless ``settings.across_processes`` is off; every process returns the same report.
    Scores found in the score cache are not computed again."""
    runtime = current() if settings.across_processes else LOCAL
    settings = replace(settings, device=runtime.device(settings.device))
    show_progress = show_progress and runtime.is_main
    specs = pool.select(tasks)
    models = runtime.main_first(lambda: fetch_pool(pool, specs, token=token, show_progress=show_progress))
    cache = ScoreCache(settings) if settings.score_cache else None
    per_task = len(fused) + (2 if baselines else 0)
    results = []
    with progress_bar(total=len(specs) * per_task, desc="evaluating", unit="score", disable=not show_progress) as bar:
        for spec in specs:
            context = TaskContext(models.base, models.experts[spec.name], tuple(pool.heads))
            candidates = _candidates(fused, spec.name, models, baselines)
            results.append(_score_task(spec, context, candidates, settings, cache, runtime, show_progress, bar))
    first = next(iter(fused), PRETRAINED)
    return EvaluationReport(fused=first, results=results, pool=pool.name, limit=settings.limit)


def _candidates(
    fused: Mapping[str, Path | Mapping[str, Path]], task: str, models: PoolModels, baselines: bool
) -> list[ModelUnderTest]:
    """The models scored on ``task``: each fused model's folder for it, then the pretrained model and the expert."""
    candidates = [ModelUnderTest(label, _for_task(folder, task), models.base) for label, folder in fused.items()]
    if baselines:
        expert = models.experts[task]
        candidates += [ModelUnderTest(PRETRAINED, models.base), ModelUnderTest(INDIVIDUAL, expert.folder, expert.base)]
    return candidates


def _score_task(
    spec: TaskSpec,
    context: TaskContext,
    candidates: list[ModelUnderTest],
    settings: EvalSettings,
    cache: ScoreCache | None,
    runtime: Runtime,
    show_progress: bool,
    bar: Any,
) -> TaskResult:
    """One task's scores: cached ones read back (as the main process found them, so every process agrees), the
    others computed by one evaluator whose data and shared parts are prepared once, then stored."""
    keys: dict[str, str] = {}
    found: dict[str, CachedScore | None] = {}
    if cache is not None and runtime.is_main:  # the main process alone hashes the models and reads the cache
        keys = {m.label: cache.key(m, spec, context) for m in candidates}
        found = {label: cache.get(key) for label, key in keys.items()}
    found = runtime.broadcast(found)
    scores: dict[str, float | None] = {}
    cached = [entry for entry in found.values() if entry is not None]
    examples = cached[0].examples if cached else 0
    metric_source = cached[0].metric_source if cached else ""
    evaluator = None
    for model in candidates:
        entry = found.get(model.label)
        if entry is None:
            # the main process loads (and downloads) the task's data first, the others then read it from the cache
            evaluator = evaluator or runtime.main_first(lambda: EVALUATORS[spec.kind](spec, context, settings))
            value = _score(evaluator, model, spec.name, runtime, show_progress)
            examples, metric_source = len(evaluator.data), evaluator.metric_source
            if cache is not None and runtime.is_main:
                cache.put(keys[model.label], CachedScore(value, examples, metric_source))
        else:
            value = entry.score
        scores[model.label] = value
        bar.update(1)
    return TaskResult(
        task=spec.name,
        task_type=spec.task_type,
        dataset=spec.dataset,
        dataset_config=spec.config,
        split=spec.split,
        metric=spec.metric,
        scores=scores,
        metric_source=metric_source,
        examples=examples,
        subset_seed=_subset_seed(settings.limit, examples),
    )
