"""The evaluation report written next to a fused model (``evaluation.json``); cards and leaderboards read it."""

from __future__ import annotations

from pathlib import Path

import pydantic

from hf_fusion.atomic import write_text_atomically

REPORT_FILENAME = "evaluation.json"


class TaskResult(pydantic.BaseModel):
    """One task's scores for every evaluated model (the fused one, the pretrained base, each expert)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    task: str
    task_type: str = pydantic.Field(description="Hub task id, e.g. text-classification")
    dataset: str = pydantic.Field(description="Hub dataset id (or a local dataset's name)")
    dataset_config: str | None = None
    split: str = "test"
    metric: str = pydantic.Field(description="evaluate metric name, e.g. accuracy")
    scores: dict[str, float | None] = pydantic.Field(
        description="model label -> score; null when the metric is undefined (Spearman of constant predictions)"
    )
    metric_source: str | None = pydantic.Field(None, description="hub or bundled: where the metric module came from")
    examples: int | None = pydantic.Field(None, description="how many examples were scored")
    subset_seed: int | None = pydantic.Field(
        None,
        description="set when only part of the split was scored (--limit): the split was shuffled with this "
        "seed and its first `examples` kept; null when the whole split was scored",
    )

    @property
    def is_subset(self) -> bool:
        return self.subset_seed is not None

    def split_label(self) -> str:
        """The split as a reader should see it: ``test``, or ``test (seeded sample of 100)`` for a subset."""
        if not self.is_subset:
            return self.split
        size = f" of {self.examples}" if self.examples is not None else ""
        return f"{self.split} (sample{size}, seed {self.subset_seed})"


class EvaluationReport(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    fused: str = pydantic.Field("fused", description="the key of the fused model in every `scores` mapping")
    results: list[TaskResult]
    pool: str | None = None
    limit: int | None = pydantic.Field(None, description="examples per task when a subset was scored")

    def save(self, folder: Path) -> Path:
        """Writes ``evaluation.json`` into ``folder`` atomically (a reader never sees half a report)."""
        return write_text_atomically(folder / REPORT_FILENAME, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> EvaluationReport | None:
        path = folder / REPORT_FILENAME
        return cls.model_validate_json(path.read_text()) if path.is_file() else None

    @property
    def subset_results(self) -> list[TaskResult]:
        """The tasks scored on part of their split (a ``--limit`` run)."""
        return [r for r in self.results if r.is_subset]

    def columns(self) -> list[str]:
        """Model labels in table order: the fused model first, then the others as they first appear."""
        seen = [self.fused] if any(self.fused in r.scores for r in self.results) else []
        for r in self.results:
            seen += [k for k in r.scores if k not in seen]
        return seen


def join_reports(reports: list[EvaluationReport]) -> EvaluationReport:
    """One report holding every model of ``reports`` (each scored on its own: one per ``bench`` configuration, one
    for the baselines), task by task in the order the tasks first appear, each task's scores in the order of the
    reports; the joined report's fused model is the first report's. The reports must agree on what each task scored
    (dataset, split, metric, examples, sample seed) and hold each model once."""
    if not reports:
        return EvaluationReport(results=[])
    joined: dict[str, TaskResult] = {}
    for report in reports:
        for result in report.results:
            first = joined.get(result.task)
            if first is None:
                joined[result.task] = result.model_copy(update={"scores": dict(result.scores)})
                continue
            same = ("task_type", "dataset", "dataset_config", "split", "metric", "examples", "subset_seed")
            differ = [f for f in same if getattr(first, f) != getattr(result, f)]
            if differ:
                raise ValueError(f"the reports scored task {result.task!r} differently ({', '.join(differ)}).")
            twice = sorted(set(first.scores) & set(result.scores))
            if twice:
                raise ValueError(f"task {result.task!r} is scored for {', '.join(twice)} in more than one report.")
            first.scores.update(result.scores)
            if first.metric_source is None:
                first.metric_source = result.metric_source
    head = reports[0]
    return EvaluationReport(
        fused=head.fused,
        results=list(joined.values()),
        pool=next((r.pool for r in reports if r.pool is not None), None),
        limit=head.limit,
    )
