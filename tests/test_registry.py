"""The registry is the single source of method metadata: names, aliases, parameters, defaults."""

from __future__ import annotations

import pytest

from hf_fusion.errors import ParameterError, UnknownMethodError
from hf_fusion.registry import BaseUse, all_methods, get_method

FUSIONBENCH_DEFAULTS = {
    "task_arithmetic": {"scaling_factor": 0.3},
    "ties_merging": {"scaling_factor": 0.3, "threshold": 20, "merge_func": "sum"},
    "dare_simple_average": {"sparsity_ratio": 0.5, "rescale": "inverse"},
    "dare_task_arithmetic": {"scaling_factor": 0.3, "sparsity_ratio": 0.5, "rescale": "inverse"},
    "dare_ties_merging": {"scaling_factor": 0.5, "threshold": 20, "sparsity_ratio": 0.5, "merge_func": "sum"},
    "linear_interpolation": {"t": 0.5},
    "slerp": {"t": 0.5, "dot_threshold": 0.9995, "epsilon": 1e-8},
    "expo": {"extrapolation_factor": 0.1},
    "weighted_average": {"normalize": True},
}


@pytest.mark.parametrize("name", list(FUSIONBENCH_DEFAULTS))
def test_fusionbench_defaults(name: str) -> None:
    defaults = get_method(name).defaults()
    for key, value in FUSIONBENCH_DEFAULTS[name].items():
        assert defaults[key] == value


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("ties", "ties_merging"),
        ("TIES-merging", "ties_merging"),
        ("dare_ties", "dare_ties_merging"),
        ("dare_linear", "dare_task_arithmetic"),
        ("linear", "weighted_average"),
        ("lerp", "linear_interpolation"),
        ("ExPO", "expo"),
    ],
)
def test_aliases_of_fusionbench_and_mergekit(alias: str, canonical: str) -> None:
    assert get_method(alias).name == canonical


def test_every_method_is_documented() -> None:
    for spec in all_methods():
        assert spec.summary and spec.paper and spec.paper.url.startswith("https://")
        for p in spec.parameters():
            assert p.description, (spec.name, p.name)
        assert spec.base in BaseUse


def test_fusionbench_spellings_of_parameters() -> None:
    assert get_method("slerp").validate_params({"DOT_THRESHOLD": 0.9}).dot_threshold == 0.9
    assert get_method("dare_ties").validate_params({"rescale": True}).rescale == "inverse"
    assert get_method("dare_ties").validate_params({"rescale": False}).rescale == "none"


def test_unknown_names_suggest() -> None:
    with pytest.raises(UnknownMethodError, match="Did you mean 'task_arithmetic'"):
        get_method("task_arithmatic")
    with pytest.raises(ParameterError, match="Did you mean 'extrapolation_factor'"):
        get_method("expo").validate_params({"extrapolation": 1})


def test_each_method_declares_the_kind_its_implementation_is() -> None:
    from hf_fusion.engine.contract import TensorMerge
    from hf_fusion.modelwise.base import ModelFusion
    from hf_fusion.registry import MethodKind

    contracts = {MethodKind.TENSOR_WISE: TensorMerge, MethodKind.MODEL_WISE: ModelFusion}
    for spec in all_methods():
        assert issubclass(spec.implementation, contracts[spec.kind]), (spec.name, spec.kind)
    kinds = {spec.kind for spec in all_methods()}
    assert kinds == set(MethodKind)


def test_common_method_flags_follow_one_rule_for_merge_and_bench() -> None:
    from hf_fusion.registry import flag_parameters, get_method

    ties, ada = get_method("ties_merging"), get_method("layer_wise_adamerging")
    assert flag_parameters([ties, ada], {"steps": 5, "batch_size": 8}) == [{}, {"steps": 5, "batch_size": 8}]
    assert flag_parameters([ties], {"batch_size": 8}) == [{}]  # also evaluation's batch size: never refused
    with pytest.raises(ParameterError, match="--steps is not a parameter of ties_merging, task_arithmetic"):
        flag_parameters([ties, get_method("task_arithmetic")], {"steps": 5})


def test_merge_and_bench_refuse_a_flag_no_chosen_method_takes(tmp_path) -> None:
    from hf_fusion.cli import main

    assert (
        main(
            [
                "merge",
                "--pool",
                "minilm-text3",
                "--method",
                "ties_merging",
                "--steps",
                "5",
                "--output",
                str(tmp_path / "m"),
            ]
        )
        == 1
    )
    assert (
        main(
            [
                "bench",
                "--pool",
                "minilm-text3",
                "--methods",
                "ties_merging,task_arithmetic",
                "--lr",
                "0.1",
                "--output",
                str(tmp_path / "b"),
            ]
        )
        == 1
    )
    assert not (tmp_path / "m").exists() and not (tmp_path / "b").exists()
