"""PNG plots of evaluation reports: per-task grouped bars, and the average score against a swept parameter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hf_fusion.reports.report import EvaluationReport


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(report: EvaluationReport, path: Path, labels: Sequence[str] | None = None) -> Path:
    """One group of bars per task, one bar per model."""
    plt = _pyplot()
    labels = list(labels or report.columns())
    tasks = [r.task for r in report.results]
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2) + (3.0 if len(labels) > 4 else 0.0), 4.0))
    for i, label in enumerate(labels):
        values = [r.scores.get(label) or 0.0 for r in report.results]
        ax.bar([t + i * width for t in range(len(tasks))], values, width, label=label)
    ax.set_xticks([t + width * (len(labels) - 1) / 2 for t in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel(report.results[0].metric if report.results else "score")
    ax.set_title(f"{report.pool or 'pool'}: scores per task")
    if len(labels) > 4:  # many models: the legend goes beside the axes, never over the bars
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_lines(
    series: dict[str, list[tuple[float, float]]], parameter: str, path: Path, baselines: dict[str, float] | None = None
) -> Path:
    """Average score against a parameter's value, one line per method; baselines as horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for method, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    for label, value in (baselines or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, label=label, color="gray" if label == "pretrained" else "black")
    ax.set_xlabel(parameter)
    ax.set_ylabel("average score")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
