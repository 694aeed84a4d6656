"""Exact match of generated strings against references (hf-fusion's bundled metric module)."""

import string

import datasets
import evaluate
import numpy


class ExactMatch(evaluate.Metric):
    """Same inputs, options and output key as the Hub's `exact_match` metric, for use without the Hub."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predictions identical to their reference, after optional normalisation.",
            citation="",
            inputs_description="predictions, references: list of str; ignore_case, ignore_punctuation (bool)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=False, ignore_punctuation=False, ignore_numbers=False):
        def clean(text):
            text = text.strip()
            if ignore_case:
                text = text.lower()
            if ignore_punctuation:
                text = text.translate(str.maketrans("", "", string.punctuation))
            if ignore_numbers:
                text = text.translate(str.maketrans("", "", string.digits))
            return text

        matches = [clean(p) == clean(r) for p, r in zip(predictions, references)]
        return {"exact_match": float(numpy.mean(matches)) if matches else 0.0}
