"""Perplexity from token log-likelihoods (hf-fusion's bundled metric module).

The Hub's `perplexity` measurement reloads a model by id; a fused model under evaluation is already in memory, so
the evaluation passes each text's summed negative log-likelihood and token count instead.
"""

import datasets
import evaluate
import numpy


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="exp(total negative log-likelihood / total predicted tokens) over a corpus.",
            citation="",
            inputs_description="predictions: per-text summed NLL (float); references: per-text token counts (int)",
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        total = float(numpy.sum(predictions))
        tokens = int(numpy.sum(references))
        return {"perplexity": float(numpy.exp(total / tokens)) if tokens else float("nan")}
