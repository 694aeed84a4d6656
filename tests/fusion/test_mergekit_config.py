"""mergekit's configuration format: read into a recipe, merged, and refused by name where unsupported."""

from __future__ import annotations

from pathlib import Path

import pytest
import reference as ref
import test_tensor_parameters as shared
import torch
import yaml
from test_tensor_parameters import LAYERS, expected_value, layer_of, mergekit_ties

from hf_fusion.cli import main
from hf_fusion.errors import RecipeError
from hf_fusion.fusion.mergekit import recipe_fields

llamas = shared.llamas  # the tiny Llama base and fine-tunes, shared with the per-tensor parameter tests


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _merge(config: Path, out: Path) -> None:
    assert main(["merge", "--config", str(config), "--output", str(out), "--quiet"]) == 0


def test_gradient_slerp_over_one_slice(llamas, tmp_path: Path) -> None:
    base, experts = llamas
    attn, mlp = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
    config = {
        "slices": [
            {
                "sources": [
                    {"model": str(base), "layer_range": [0, LAYERS]},
                    {"model": str(experts[0]), "layer_range": [0, LAYERS]},
                ]
            }
        ],
        "merge_method": "slerp",
        "base_model": str(base),
        "parameters": {"t": [{"filter": "self_attn", "value": attn}, {"filter": "mlp", "value": mlp}, {"value": 0.5}]},
        "dtype": "float32",
    }
    _merge(_write(tmp_path, config), tmp_path / "out")
    a, b, merged = ref.load_state(base), ref.load_state(experts[0]), ref.load_state(tmp_path / "out")
    for name in ref.floating(b):
        layer = layer_of(name)
        knots = attn if "self_attn" in name else mlp if "mlp" in name else [0.5]
        t = expected_value([float(k) for k in knots], layer)
        want = ref.slerp({name: a[name]}, {name: b[name]}, t)[name]
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)


def test_ties_with_per_model_density_and_weight(llamas, tmp_path: Path) -> None:
    base, experts = llamas
    config = {
        "models": [
            {"model": str(experts[0]), "parameters": {"density": 0.5, "weight": 1.0}},
            {"model": str(experts[1]), "parameters": {"density": 0.3, "weight": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    }
    _merge(_write(tmp_path, config), tmp_path / "out")
    b = ref.load_state(base)
    states = [ref.load_state(e) for e in experts[:2]]
    merged = ref.load_state(tmp_path / "out")
    for name in ref.floating(b):
        trimmed = [mergekit_ties(b[name], [s[name]], d, [1.0]) for s, d in zip(states, [0.5, 0.3])]
        want = mergekit_ties_weighted(b[name], trimmed, [1.0, 0.5])
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)


def mergekit_ties_weighted(base: torch.Tensor, trimmed_models: list[torch.Tensor], weights: list[float]):
    deltas = torch.stack([t - base.double() for t in trimmed_models])
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * base.dim()))
    weighted = deltas * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    mask = torch.sign(weighted) == majority
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1.0
    return base.double() + (weighted * mask).sum(0) / divisor


def test_linear_and_task_arithmetic_match_their_definitions(llamas, tmp_path: Path) -> None:
    base, experts = llamas
    linear = {
        "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, [1.0, 0.3, 0.5])],
        "merge_method": "linear",
    }
    _merge(_write(tmp_path, linear), tmp_path / "linear")
    states = [ref.load_state(e) for e in experts]
    merged = ref.load_state(tmp_path / "linear")
    for name in ref.floating(states[0]):
        want = sum(w * s[name].double() for w, s in zip([1.0, 0.3, 0.5], states)) / 1.8
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)
    ta = {
        "models": [{"model": str(e), "parameters": {"weight": [0.0, 1.0]}} for e in experts[:2]],
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "parameters": {"lambda": 0.8},
    }
    _merge(_write(tmp_path, ta), tmp_path / "ta")
    b = ref.load_state(base)
    merged = ref.load_state(tmp_path / "ta")
    for name in ref.floating(b):
        w = expected_value([0.0, 1.0], layer_of(name))
        want = b[name].double() + 0.8 * sum(w * (s[name].double() - b[name].double()) for s in states[:2])
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)


def test_passthrough_frankenmerge(llamas, tmp_path: Path) -> None:
    base, experts = llamas
    config = {
        "slices": [
            {"sources": [{"model": str(experts[0]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(experts[1]), "layer_range": [1, 5]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    _merge(_write(tmp_path, config), tmp_path / "out")
    out = ref.load_state(tmp_path / "out")
    a, b = ref.load_state(experts[0]), ref.load_state(experts[1])
    origins = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3), (b, 4)]
    for index, (state, layer) in enumerate(origins):
        name = f"model.layers.{index}.mlp.up_proj.weight"
        assert torch.equal(out[name], state[f"model.layers.{layer}.mlp.up_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 7


def test_mapping_of_dare_and_tokenizer_options() -> None:
    fields = recipe_fields(
        {
            "models": [
                {"model": "org/a", "parameters": {"density": [0.2, 0.6], "weight": 0.5}},
                {"model": "org/b", "parameters": {"density": 0.5, "weight": 0.5}},
            ],
            "base_model": "org/base",
            "merge_method": "dare_ties",
            "tokenizer_source": "union",
            "chat_template": "auto",
            "dtype": "bfloat16",
        }
    )
    assert fields["method"] == "dare_ties_merging"
    assert fields["models"] == ["org/a", "org/b"] and fields["base"] == "org/base"
    params = fields["parameters"]
    assert params["sparsity_ratios"] == [[0.8, 0.4], 0.5]
    assert params["weights"] == [0.5, 0.5] and params["rescale"] == "l1" and params["threshold"] == 100.0
    assert fields["tokenizer"] == "union" and fields["chat_template"] == "auto" and fields["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"merge_method": "linear", "models": [{"model": "a"}], "wat": 1}, "unknown key"),
        ({"merge_method": "nuslerp", "models": [{"model": "a"}]}, "'nuslerp' is not supported"),
        ({"merge_method": "frobnicate", "models": [{"model": "a"}]}, "unknown merge_method"),
        ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b"}]}, "weight"),
        ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]}, "needs base_model"),
        ({"merge_method": "linear", "modules": {"text": {}}}, "`modules`"),
        ({"merge_method": "slerp", "models": [{"model": "a+lora"}], "base_model": "b"}, "model\\+lora"),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "a", "parameters": {"weight": 1}}],
                "chat_template": "chatml",
            },
            "bundled templates",
        ),
        (
            {
                "merge_method": "task_arithmetic",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"weight": 1, "gamma": 0.1}}],
            },
            "'gamma'",
        ),
    ],
)
def test_unsupported_configs_are_refused_by_name_before_any_download(config: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe_fields(config)


def test_a_gradient_of_the_wrong_type_in_a_mergekit_file_is_refused(llamas, tmp_path: Path, capsys) -> None:
    base, experts = llamas
    config = {
        "models": [{"model": str(experts[0])}],
        "merge_method": "slerp",
        "base_model": str(base),
        "parameters": {"t": ["a", "b"]},
    }
    code = main(["merge", "--config", str(_write(tmp_path, config)), "--output", str(tmp_path / "out"), "--quiet"])
    assert code != 0
    assert "a gradient is a list of numbers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
