"""Metrics through evaluate: bundled modules agree with direct computations; Hub modules load by name."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score

import hf_fusion.metrics as metrics
from hf_fusion.metrics import MetricError, load_metric


def test_bundled_metrics_match_direct_computation() -> None:
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    accuracy, source = load_metric("accuracy", "bundled")
    assert source == "bundled"
    assert accuracy.compute(predictions=p, references=y)["accuracy"] == pytest.approx(accuracy_score(y, p))
    x, z = rng.normal(size=100), np.round(rng.normal(size=100), 1)  # ties in the references
    spearman, _ = load_metric("spearmanr", "bundled")
    assert spearman.compute(predictions=x, references=z)["spearmanr"] == pytest.approx(spearmanr(x, z).statistic)
    exact, _ = load_metric("exact_match", "bundled")
    result = exact.compute(
        predictions=[" Yes.", "no", "maybe"], references=["yes", "No", "no"], ignore_case=True, ignore_punctuation=True
    )
    assert result["exact_match"] == pytest.approx(2 / 3)
    perplexity, _ = load_metric("perplexity", "auto")
    assert perplexity.compute(predictions=[3.0, 5.0], references=[2, 3])["perplexity"] == pytest.approx(math.exp(8 / 5))


def test_hub_metric_loads_by_name(hub) -> None:
    module = Path(metrics.__file__).parent / "accuracy" / "accuracy.py"
    hub.state.create("evaluate-metric/accuracy", "space", sdk="gradio")
    hub.state.upload("evaluate-metric/accuracy", {"accuracy.py": module.read_bytes()}, repo_type="space")
    accuracy, source = load_metric("accuracy", "hub")
    assert source == "hub"
    assert accuracy.compute(predictions=[1, 1], references=[1, 0])["accuracy"] == 0.5
    fetched = [p for m, p, _, _ in hub.state.requests if "evaluate-metric/accuracy" in p]
    assert fetched and all(p.startswith("/spaces/evaluate-metric/accuracy/") for p in fetched)


def test_missing_hub_metric_is_an_error_not_a_fallback() -> None:
    with pytest.raises(MetricError, match="cannot load metric 'f1_macro_nope' from the Hub.*HF_HUB_OFFLINE=1"):
        load_metric("f1_macro_nope", "hub")
    with pytest.raises(MetricError, match="no bundled module for metric 'f1_macro_nope'"):
        load_metric("f1_macro_nope", "bundled")
