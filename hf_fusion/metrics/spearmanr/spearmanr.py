"""Spearman rank correlation (hf-fusion's bundled metric module)."""

import datasets
import evaluate
import numpy


def _ranks(values):
    """Ranks starting at 1, ties sharing their average rank."""
    order = numpy.argsort(values, kind="mergesort")
    ranks = numpy.empty(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


class Spearmanr(evaluate.Metric):
    """Same inputs and output key as the Hub's `spearmanr` metric, for use without the Hub."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Pearson correlation of the ranks of predictions and references.",
            citation="",
            inputs_description="predictions, references: list of float",
            features=datasets.Features({"predictions": datasets.Value("float"), "references": datasets.Value("float")}),
        )

    def _compute(self, predictions, references):
        x = _ranks(numpy.asarray(predictions, dtype=float))
        y = _ranks(numpy.asarray(references, dtype=float))
        x = x - x.mean()
        y = y - y.mean()
        denominator = numpy.sqrt((x * x).sum() * (y * y).sum())
        return {"spearmanr": float((x * y).sum() / denominator) if denominator > 0 else float("nan")}
