"""Method parameters a careless user might type: NaN, infinity, booleans where numbers go; refused before any read."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_fusion
from hf_fusion.errors import FusionError, ParameterError, RecipeError


@pytest.mark.parametrize(
    "method, params",
    [
        ("weighted_average", {"weights": [math.nan, 1.0, 1.0]}),
        ("weighted_average", {"weights": [math.inf, 1.0, 1.0]}),
        ("weighted_average", {"weights": [1.0, "-inf", 1.0]}),
        ("karcher_mean", {"weights": [math.nan, math.nan, math.nan]}),
        ("task_arithmetic", {"scaling_factor": math.nan}),
        ("ties_merging", {"scaling_factor": -math.inf}),
    ],
)
def test_non_finite_parameters_are_refused_as_not_finite(tmp_path: Path, bert_pool, method: str, params: dict) -> None:
    base, experts = bert_pool
    with pytest.raises(ParameterError, match="must be a finite number") as err:
        hf_fusion.merge(
            models=[str(e) for e in experts],
            base=str(base),
            method=method,
            output=tmp_path / "out",
            show_progress=False,
            **params,
        )
    assert "less than" not in str(err.value) and "greater than" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "method, params",
    [
        ("task_arithmetic", {"scaling_factor": True}),
        ("weighted_average", {"weights": [True, False, True]}),
        ("karcher_mean", {"max_iter": True}),
    ],
)
def test_booleans_where_numbers_are_expected_are_refused(tmp_path: Path, bert_pool, method: str, params: dict) -> None:
    base, experts = bert_pool
    with pytest.raises(ParameterError, match="must be a number, not a boolean"):
        hf_fusion.merge(
            models=[str(e) for e in experts],
            base=str(base),
            method=method,
            output=tmp_path / "out",
            show_progress=False,
            **params,
        )


def test_booleans_where_booleans_are_expected_still_work() -> None:
    from hf_fusion.registry import get_method

    assert get_method("weighted_average").validate_params({"normalize": False}).normalize is False
    assert get_method("dare_ties").validate_params({"rescale": True}).rescale == "inverse"


@pytest.mark.parametrize(
    "param, needle",
    [
        ("scaling_factor=.nan", "must be a finite number (got nan)"),
        ("scaling_factor=.inf", "must be a finite number (got inf)"),
        ("scaling_factor=true", "must be a number, not a boolean (got true)"),
    ],
)
def test_cli_refuses_bad_parameter_with_a_message(tmp_path: Path, bert_pool, param: str, needle: str) -> None:
    base, experts = bert_pool
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_fusion",
            "merge",
            "--repo-ids",
            *map(str, experts),
            "--base",
            str(base),
            "--method",
            "task_arithmetic",
            "--param",
            param,
            "--output",
            str(tmp_path / "out"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("hf-fusion: error: "), proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_huge_normalised_weights_give_the_same_model_as_small_ones(tmp_path: Path, bert_pool) -> None:
    from safetensors.torch import load_file

    _, experts = bert_pool
    models = [str(e) for e in experts[:2]]
    huge = hf_fusion.merge(
        models=models, method="weighted_average", weights=[3e300, 1e300], output=tmp_path / "huge", show_progress=False
    )
    small = hf_fusion.merge(
        models=models, method="weighted_average", weights=[3.0, 1.0], output=tmp_path / "small", show_progress=False
    )
    a, b = load_file(huge.output / "model.safetensors"), load_file(small.output / "model.safetensors")
    for name in b:
        assert torch.isfinite(a[name]).all(), name
        torch.testing.assert_close(a[name], b[name])


@pytest.mark.parametrize("method", ["weighted_average", "karcher_mean"])
def test_weights_whose_sum_overflows_are_refused(tmp_path: Path, bert_pool, method: str) -> None:
    _, experts = bert_pool
    with pytest.raises(RecipeError, match="overflows"):
        hf_fusion.merge(
            models=[str(e) for e in experts[:2]],
            method=method,
            weights=[1e308, 1e308],
            output=tmp_path / "out",
            show_progress=False,
        )


def test_unnormalised_weights_that_overflow_are_not_written(tmp_path: Path, bert_pool) -> None:
    _, experts = bert_pool
    with pytest.raises(FusionError, match="overflow") as err:
        hf_fusion.merge(
            models=[str(e) for e in experts[:2]],
            method="weighted_average",
            weights=[1e300, 1.0],
            normalize=False,
            output=tmp_path / "out",
            show_progress=False,
        )
    assert "tensor" in str(err.value)
    assert not (tmp_path / "out").exists()
