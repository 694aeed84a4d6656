"""Leaderboards from evaluation reports: one row per model, the per-task scores, their average, and the normalised
score (each task's score over the task's own expert's, averaged), as FusionBench's tables report them."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from hf_fusion.report import EvaluationReport

INDIVIDUAL = "individual"


@dataclass(frozen=True)
class Row:
    label: str
    scores: dict[str, float]
    average: float
    normalized: float | None


def rows(report: EvaluationReport, order: list[str] | None = None) -> list[Row]:
    labels = order or _ordered_labels(report)
    out = []
    for label in labels:
        scores = {r.task: r.scores[label] for r in report.results if r.scores.get(label) is not None}
        if not scores:
            continue
        ratios = [r.scores[label] / r.scores[INDIVIDUAL] for r in report.results  # type: ignore[operator]
                  if r.scores.get(label) is not None and r.scores.get(INDIVIDUAL)]
        normalized = sum(ratios) / len(ratios) if len(ratios) == len(report.results) else None
        out.append(Row(label, scores, sum(scores.values()) / len(scores), normalized))  # type: ignore[arg-type]
    return out


def _ordered_labels(report: EvaluationReport) -> list[str]:
    baselines = [l for l in ("pretrained", INDIVIDUAL) if any(l in r.scores for r in report.results)]
    others = [l for l in report.columns() if l not in baselines]
    return baselines + others


def to_markdown(report: EvaluationReport, order: list[str] | None = None, *, percent: bool = True) -> str:
    """A markdown table; the best fused score per column is bold (baselines are not ranked)."""
    table = rows(report, order)
    tasks = [r.task for r in report.results]
    scale = 100.0 if percent and all(r.metric in ("accuracy", "exact_match") for r in report.results) else 1.0
    columns = tasks + ["average", "normalized"]

    def value(row: Row, column: str) -> float | None:
        if column == "average":
            return row.average
        if column == "normalized":
            return row.normalized
        return row.scores.get(column)

    ranked = [r for r in table if r.label not in ("pretrained", INDIVIDUAL)]
    pick = min if all(r.metric == "perplexity" for r in report.results) else max  # lower perplexity is better
    best = {c: pick((value(r, c) for r in ranked if value(r, c) is not None), default=None) for c in columns}
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in table:
        cells = []
        for column in columns:
            v = value(row, column)
            if v is None:
                cells.append("")
                continue
            text = f"{v * (100.0 if column == 'normalized' else scale):.1f}"
            cells.append(f"**{text}**" if row in ranked and v == best[column] and len(ranked) > 1 else text)
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(report: EvaluationReport, order: list[str] | None = None) -> str:
    tasks = [r.task for r in report.results]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", *tasks, "average", "normalized"])
    for row in rows(report, order):
        writer.writerow([row.label, *(row.scores.get(t, "") for t in tasks), row.average,
                         "" if row.normalized is None else row.normalized])
    return buffer.getvalue()
