"""Per-tensor parameters: gradients over the layers and name filters, resolved per tensor and applied by the engine."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

import hf_fusion
from hf_fusion.errors import ParameterError, RecipeError
from hf_fusion.recipe import RECIPE_FILENAME

LAYERS = 5


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("llamas")
    base = _llama(0)
    base.save_pretrained(root / "base")
    experts = []
    for i in range(3):
        model = _llama(0)
        generator = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05 * (i + 1))
        model.save_pretrained(root / f"ft{i}")
        experts.append(root / f"ft{i}")
    return root / "base", experts


def expected_value(knots: list[float], layer: int | None) -> float:
    """mergekit's rule, computed independently: knots evenly spaced over [0, 1], interpolated with numpy; tensors
    outside the layer stack sit at position 0."""
    position = 0.0 if layer is None else layer / (LAYERS - 1)
    return float(np.interp(position, np.linspace(0.0, 1.0, len(knots)), knots))


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


ATTN = [0.0, 0.5, 0.3, 0.7, 1.0]
MLP = [1.0, 0.5, 0.7, 0.3, 0.0]


def test_slerp_with_gradients_and_filters_from_the_command_line(llamas, tmp_path: Path) -> None:
    from hf_fusion.cli import main

    base, experts = llamas
    out = tmp_path / "slerp"
    code = main(
        [
            "merge",
            "--repo-ids",
            str(experts[0]),
            "--base",
            str(base),
            "--method",
            "slerp",
            "--param",
            "t=0.25",
            "--param-for",
            "self_attn",
            f"t={ATTN}",
            "--param-for",
            "mlp",
            f"t={MLP}",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    a, b, merged = ref.load_state(base), ref.load_state(experts[0]), ref.load_state(out)
    seen = set()
    for name in ref.floating(b):
        layer = layer_of(name)
        if "self_attn" in name:
            t = expected_value(ATTN, layer)
        elif "mlp" in name:
            t = expected_value(MLP, layer)
        else:
            t = 0.25
        seen.add(round(t, 6))
        want = ref.slerp({name: a[name]}, {name: b[name]}, t)[name]
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)
    assert len(seen) > 5  # the values really vary by tensor
    recipe = yaml.safe_load((out / RECIPE_FILENAME).read_text())
    assert recipe["parameters"]["t"] == [
        {"filter": "self_attn", "value": ATTN},
        {"filter": "mlp", "value": MLP},
        {"value": 0.25},
    ]
    # the recorded recipe reproduces the merge
    again = hf_fusion.merge(out / RECIPE_FILENAME, output=tmp_path / "again", show_progress=False)
    assert all(torch.equal(merged[k], v) for k, v in ref.load_state(again.output).items())


def test_per_model_weight_gradient_in_task_arithmetic(llamas, tmp_path: Path) -> None:
    base, experts = llamas
    weights = [[0.0, 1.0], 0.5, [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]]
    result = hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="task_arithmetic",
        **{"weights": weights, "scaling_factor": 0.4},
        output=tmp_path / "ta",
        show_progress=False,
    )
    b = ref.load_state(base)
    states = [ref.load_state(e) for e in experts]
    merged = ref.load_state(result.output)
    for name in ref.floating(b):
        w = [expected_value([0.0, 1.0], layer_of(name)), 0.5, 2.0 if "mlp" in name else 1.0]
        want = b[name].double() + 0.4 * sum(wi * (s[name].double() - b[name].double()) for wi, s in zip(w, states))
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)


def mergekit_ties(
    base: torch.Tensor, experts: list[torch.Tensor], density: float, weights: list[float]
) -> torch.Tensor:
    """mergekit's TIES on one tensor, written from its definition: top-k per model and tensor, weighted sign
    vote (a zero sum counts as positive), agreeing values summed and divided by the agreeing weights."""
    deltas = []
    for expert in experts:
        delta = (expert - base).double().flatten()
        k = max(1, int(density * delta.numel()))
        keep = torch.zeros_like(delta, dtype=torch.bool)
        keep[delta.abs().argsort(descending=True)[:k]] = True
        deltas.append(delta * keep)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float64).view(-1, 1)
    weighted = stacked * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    mask = torch.sign(weighted) == majority
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1.0
    mixed = (weighted * mask).sum(0) / divisor
    return (base.double().flatten() + mixed).view(base.shape)


def test_ties_with_per_model_weights_and_thresholds_matches_the_weighted_definition(llamas, tmp_path: Path) -> None:
    base, experts = llamas
    weights, thresholds = [1.0, 0.5, 0.25], [30.0, 50.0, 70.0]
    result = hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="ties_merging",
        **{
            "threshold_scope": "tensor",
            "keep_count": "exact",
            "thresholds": thresholds,
            "weights": weights,
            "merge_func": "mean",
            "scaling_factor": 1.0,
        },
        output=tmp_path / "ties",
        show_progress=False,
    )
    b = ref.load_state(base)
    states = [ref.load_state(e) for e in experts]
    merged = ref.load_state(result.output)
    for name in ref.floating(b):
        if b[name].dim() < 2:
            continue
        # each model keeps its own share: per-model thresholds, one density per model
        trimmed_each = [
            mergekit_ties(b[name], [s[name]], t / 100, [1.0]) - b[name].double() for s, t in zip(states, thresholds)
        ]
        want_signs = torch.stack([tv * w for tv, w in zip(trimmed_each, weights)]).sum(0)
        assert want_signs.abs().sum() > 0
        got = merged[name].double()
        want = _weighted_ties_from_trimmed(b[name].double(), trimmed_each, weights)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def _weighted_ties_from_trimmed(base: torch.Tensor, trimmed: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack(trimmed)
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * base.dim()))
    weighted = stacked * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    mask = torch.sign(weighted) == majority
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1.0
    return base + (weighted * mask).sum(0) / divisor


def test_ties_threshold_gradient_with_tensor_scope(llamas, tmp_path: Path) -> None:
    base, experts = llamas
    result = hf_fusion.merge(
        models=[str(e) for e in experts[:1]],
        base=str(base),
        method="ties_merging",
        **{"threshold_scope": "tensor", "keep_count": "exact", "threshold": [10.0, 90.0], "scaling_factor": 1.0},
        output=tmp_path / "ties-gradient",
        show_progress=False,
    )
    b = ref.load_state(base)
    merged = ref.load_state(result.output)
    for name in ref.floating(b):
        density = expected_value([10.0, 90.0], layer_of(name)) / 100
        kept = int((merged[name] != b[name]).sum())
        assert kept == max(1, int(density * b[name].numel())), name


@pytest.mark.parametrize(
    ("method", "parameters", "message"),
    [
        ("slerp", {"t": []}, "empty list"),
        ("slerp", {"t": ["a", "b"]}, "a gradient is a list of numbers"),
        ("slerp", {"t": [0.0, 1.5]}, "less than or equal to 1"),
        ("slerp", {"t": [{"filtr": "mlp", "value": 0.3}]}, "unknown key"),
        ("ties_merging", {"threshold": [10, 20]}, "same for every tensor"),
        ("consensus_merging", {"k": [1, 2]}, "whole numbers"),
        ("fisher_merging", {"calibration_samples": [1, 2]}, "fuses whole models"),
    ],
)
def test_malformed_per_tensor_values_are_refused_before_any_work(
    llamas, tmp_path: Path, method: str, parameters: dict, message: str
) -> None:
    base, experts = llamas
    with pytest.raises((ParameterError, RecipeError), match=message):
        hf_fusion.merge(
            models=[str(e) for e in experts[:2]] if method != "slerp" else [str(experts[0])],
            base=str(base),
            method=method,
            **parameters,
            output=tmp_path / "out",
            pool="minilm-text3" if method == "fisher_merging" else None,
            show_progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_gradient_longer_than_the_layer_stack_is_refused(llamas, tmp_path: Path) -> None:
    base, experts = llamas
    with pytest.raises(ParameterError, match=f"gradient of 7 values, but the models have {LAYERS} layers"):
        hf_fusion.merge(
            models=[str(experts[0])],
            base=str(base),
            method="slerp",
            **{"t": [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]},
            output=tmp_path / "out",
            show_progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_a_filter_that_matches_nothing_is_reported(llamas, tmp_path: Path, caplog) -> None:
    base, experts = llamas
    with caplog.at_level(logging.WARNING):
        hf_fusion.merge(
            models=[str(experts[0])],
            base=str(base),
            method="slerp",
            **{"t": [{"filter": "attention.self", "value": 0.9}, {"value": 0.5}]},
            output=tmp_path / "out",
            show_progress=False,
        )
    assert "'attention.self' match no tensor name" in caplog.text
    assert "model.layers.0" in caplog.text or "model.embed_tokens" in caplog.text
