"""Leaderboards from evaluation reports: one row per model, the per-task scores, their average, and the normalised
score (each task's score over the task's own expert's, averaged), as FusionBench's tables report them."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from hf_fusion.reports.report import EvaluationReport

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
        ratios = [
            r.scores[label] / r.scores[INDIVIDUAL]
            for r in report.results  # type: ignore[operator]
            if r.scores.get(label) is not None and r.scores.get(INDIVIDUAL)
        ]
        normalized = sum(ratios) / len(ratios) if len(ratios) == len(report.results) else None
        out.append(Row(label, scores, sum(scores.values()) / len(scores), normalized))  # type: ignore[arg-type]
    return out


def _ordered_labels(report: EvaluationReport) -> list[str]:
    baselines = [name for name in ("pretrained", INDIVIDUAL) if any(name in r.scores for r in report.results)]
    others = [name for name in report.columns() if name not in baselines]
    return baselines + others


@dataclass(frozen=True)
class Table:
    """A leaderboard laid out for display: cells already scaled (percent where the metric is a rate), and the
    best fused value of each column marked (baselines are not ranked)."""

    columns: list[str]
    labels: list[str]
    cells: list[list[float | None]]
    best: set[tuple[int, int]]


def table(report: EvaluationReport, order: list[str] | None = None, *, percent: bool = True) -> Table:
    board = rows(report, order)
    tasks = [r.task for r in report.results]
    scale = 100.0 if percent and all(r.metric in ("accuracy", "exact_match") for r in report.results) else 1.0
    columns = tasks + ["average", "normalized"]

    def value(row: Row, column: str) -> float | None:
        raw = (
            row.average if column == "average" else row.normalized if column == "normalized" else row.scores.get(column)
        )
        return None if raw is None else raw * (100.0 if column == "normalized" else scale)

    cells = [[value(row, c) for c in columns] for row in board]
    ranked = [i for i, row in enumerate(board) if row.label not in ("pretrained", INDIVIDUAL)]
    lower_is_better = all(r.metric == "perplexity" for r in report.results)
    best: set[tuple[int, int]] = set()
    if len(ranked) > 1:
        for j, _column in enumerate(columns):
            present = [cells[i][j] for i in ranked if cells[i][j] is not None]
            if not present:
                continue
            target = min(present) if lower_is_better else max(present)  # perplexity (and its ratio): lower wins
            best |= {(i, j) for i in ranked if cells[i][j] == target}
    return Table(columns, [row.label for row in board], cells, best)


def to_markdown(report: EvaluationReport, order: list[str] | None = None, *, percent: bool = True) -> str:
    """A markdown table; the best fused score per column is bold (baselines are not ranked)."""
    laid = table(report, order, percent=percent)
    lines = ["| model | " + " | ".join(laid.columns) + " |", "|---|" + "---:|" * len(laid.columns)]
    for i, (label, values) in enumerate(zip(laid.labels, laid.cells)):
        texts = [
            "" if v is None else f"**{v:.1f}**" if (i, j) in laid.best else f"{v:.1f}" for j, v in enumerate(values)
        ]
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def to_csv(report: EvaluationReport, order: list[str] | None = None) -> str:
    tasks = [r.task for r in report.results]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", *tasks, "average", "normalized"])
    for row in rows(report, order):
        writer.writerow(
            [
                row.label,
                *(row.scores.get(t, "") for t in tasks),
                row.average,
                "" if row.normalized is None else row.normalized,
            ]
        )
    return buffer.getvalue()
