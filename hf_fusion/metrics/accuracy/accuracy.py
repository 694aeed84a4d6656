"""Accuracy: the fraction of predictions equal to their reference (hf-fusion's bundled metric module)."""

import datasets
import evaluate
import numpy


class Accuracy(evaluate.Metric):
    """Same inputs and output key as the Hub's `accuracy` metric, for use without the Hub."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predictions that equal their reference label.",
            citation="",
            inputs_description="predictions: list of int; references: list of int; normalize (bool, default True)",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = numpy.asarray(predictions)
        references = numpy.asarray(references)
        weights = numpy.ones(len(predictions)) if sample_weight is None else numpy.asarray(sample_weight, dtype=float)
        correct = float(((predictions == references) * weights).sum())
        return {"accuracy": correct / weights.sum() if normalize else correct}
