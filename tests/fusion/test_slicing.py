"""Recipes with slices, end to end on tiny Llama and Qwen2 models: frankenmerges copied byte for byte and loadable,
fused slices equal to the math done by hand, the output config's layers, and errors before any weight is read."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

import hf_fusion
from hf_fusion.engine.checkpoint import SafetensorsCheckpoint
from hf_fusion.errors import FusionError, RecipeError
from hf_fusion.recipe import RECIPE_FILENAME, Recipe

LAYERS = 6


def _llama(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _qwen2(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=3,
        tie_word_embeddings=False,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("llamas")
    return _llama(root / "a", 1), _llama(root / "b", 2), _llama(root / "base", 3)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _layer(name: str, index: int) -> str:
    return name.replace("model.layers.0.", f"model.layers.{index}.")


def _one(model: Path | str, start: int, stop: int) -> dict:
    return {"sources": [{"model": str(model), "layers": [start, stop]}]}


def _merge(recipe: dict, out: Path, **kwargs) -> hf_fusion.MergeResult:
    return hf_fusion.merge(recipe, output=out, show_progress=False, **kwargs)


def test_frankenmerge_stacks_layers_byte_for_byte_and_loads(llamas, tmp_path: Path) -> None:
    a, b, _ = llamas
    recipe = {"method": "passthrough", "models": [str(a), str(b)], "slices": [_one(a, 0, 4), _one(b, 2, 6)]}
    result = _merge(recipe, tmp_path / "out")
    assert result.fused_tensors == 0
    out, wa, wb = _weights(tmp_path / "out"), _weights(a), _weights(b)
    per_layer = [n for n in wa if n.startswith("model.layers.0.")]
    assert len(out) == len(wa) + 2 * len(per_layer)
    for k in range(8):
        source, j = (wa, k) if k < 4 else (wb, k - 2)
        for name in per_layer:
            got, want = out[_layer(name, k)], source[_layer(name, j)]
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    assert torch.equal(out["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], wb["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], wb["lm_head.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 8

    fused = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    model_a = transformers.AutoModelForCausalLM.from_pretrained(a)
    model_b = transformers.AutoModelForCausalLM.from_pretrained(b)
    config = copy.deepcopy(model_a.config)
    config.num_hidden_layers = 8
    assembled = transformers.LlamaForCausalLM(config)
    assembled.model.embed_tokens = model_a.model.embed_tokens
    assembled.model.layers = torch.nn.ModuleList([*model_a.model.layers[0:4], *model_b.model.layers[2:6]])
    assembled.model.norm, assembled.lm_head = model_b.model.norm, model_b.lm_head
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = assembled(input_ids=ids, use_cache=False).logits
        got = fused(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, want)


def test_fused_slice_is_the_weighted_average_of_the_ranges_it_pairs(llamas, tmp_path: Path) -> None:
    a, b, _ = llamas
    recipe = {
        "method": "weighted_average",
        "models": [str(a), str(b)],
        "parameters": {"weights": [0.25, 0.75]},
        "slices": [{"sources": [{"model": str(a), "layers": [0, 3]}, {"model": str(b), "layers": [3, 6]}]}],
    }
    _merge(recipe, tmp_path / "out")
    out, wa, wb = _weights(tmp_path / "out"), _weights(a), _weights(b)
    assert len(out) == len(wa) - 3 * len([n for n in wa if n.startswith("model.layers.0.")])
    for name in wa:
        if not name.startswith("model.layers.0."):
            continue
        for i in range(3):
            want = 0.25 * wa[_layer(name, i)] + 0.75 * wb[_layer(name, 3 + i)]
            torch.testing.assert_close(out[_layer(name, i)], want, rtol=0, atol=1e-6)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(out[name], 0.25 * wa[name] + 0.75 * wb[name], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_copied_and_fused_slices_mix(llamas, tmp_path: Path) -> None:
    """A slice interpolated from the base to a model, then layers of the base copied; the ends are interpolated."""
    a, _, base = llamas
    recipe = {
        "method": "linear_interpolation",
        "models": [str(a)],
        "base": str(base),
        "parameters": {"t": 0.3},
        "slices": [
            {"sources": [{"model": str(base), "layers": [0, 2]}, {"model": str(a), "layers": [2, 4]}]},
            _one(base, 4, 6),
        ],
    }
    result = _merge(recipe, tmp_path / "out")
    out, wa, wbase = _weights(tmp_path / "out"), _weights(a), _weights(base)
    per_layer = [n for n in wa if n.startswith("model.layers.0.")]
    assert result.copied_tensors == 2 * len(per_layer)
    for name in per_layer:
        for i in range(2):
            want = 0.7 * wbase[_layer(name, i)] + 0.3 * wa[_layer(name, 2 + i)]
            torch.testing.assert_close(out[_layer(name, i)], want, rtol=0, atol=1e-6)
            assert torch.equal(out[_layer(name, 2 + i)], wbase[_layer(name, 4 + i)])
    torch.testing.assert_close(out["lm_head.weight"], 0.7 * wbase["lm_head.weight"] + 0.3 * wa["lm_head.weight"])
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_per_layer_config_lists_follow_their_layers(tmp_path: Path) -> None:
    a, b = _qwen2(tmp_path / "qa", 4), _qwen2(tmp_path / "qb", 5)
    types = json.loads((a / "config.json").read_text())["layer_types"]
    assert types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    recipe = {"method": "passthrough", "models": [str(a), str(b)], "slices": [_one(a, 2, 5), _one(b, 0, 2)]}
    _merge(recipe, tmp_path / "out", dtype="bfloat16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert config["layer_types"] == [types[2], types[3], types[4], types[0], types[1]]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.layer_types == config["layer_types"] and loaded.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in _weights(tmp_path / "out").values())


def test_passthrough_copies_one_model_in_the_recipe_dtype(llamas, tmp_path: Path) -> None:
    a, _, _ = llamas
    _merge({"method": "passthrough", "models": [str(a)]}, tmp_path / "out", dtype="float16")
    out, wa = _weights(tmp_path / "out"), _weights(a)
    assert out.keys() == wa.keys()
    assert all(torch.equal(out[n], wa[n].to(torch.float16)) for n in wa)


def _no_weight_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read before the recipe was refused")

    monkeypatch.setattr(SafetensorsCheckpoint, "read_rows", refuse)


@pytest.mark.parametrize(
    ("slices", "fields", "message"),
    [
        ([("b", 2, 8)], {"method": "passthrough"}, r"layers \[2, 8\) of .*b, which has 6 layers"),
        ([("a", 0, 2), ("elsewhere", 0, 2)], {"method": "passthrough"}, "not among the recipe's models"),
        ([("a", 0, 2), ("b", 0, 2)], {"method": "slerp"}, "nothing to fuse: use method passthrough"),
        ([[("a", 0, 2), ("b", 0, 2)]], {"method": "passthrough"}, "slice 1 has 2 sources, but passthrough"),
        ([[("a", 0, 2), ("b", 0, 2)]], {"method": "ties", "base": "base"}, "has no range of .*base"),
        ([[("a", 0, 2), ("b", 0, 3)]], {"method": "slerp"}, "as many layers each"),
        ([("base", 0, 2)], {"method": "passthrough", "base": "base"}, "the base .* does not read; list it in models"),
        ([[("a", 0, 2), ("b", 0, 2)]], {"method": "simple_ensemble"}, "need a tensor-wise method"),
    ],
)
def test_bad_slices_are_refused_before_any_weight_is_read(
    llamas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slices: list, fields: dict, message: str
) -> None:
    a, b, base = llamas
    where = {"a": a, "b": b, "base": base, "elsewhere": tmp_path / "elsewhere"}
    _no_weight_reads(monkeypatch)
    recipe = {
        "models": [str(a), str(b)],
        **{k: str(where[v]) if k == "base" else v for k, v in fields.items()},
        "slices": [
            {
                "sources": [
                    {"model": str(where[m]), "layers": [s, e]} for m, s, e in (out if isinstance(out, list) else [out])
                ]
            }
            for out in slices
        ],
    }
    with pytest.raises(FusionError, match=message):
        _merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_passthrough_of_several_models_needs_slices(llamas, tmp_path: Path) -> None:
    a, b, _ = llamas
    with pytest.raises(RecipeError, match="passthrough copies one model"):
        _merge({"method": "passthrough", "models": [str(a), str(b)]}, tmp_path / "out")


def test_cli_recipe_runs_and_its_saved_copy_reproduces_the_merge(llamas, tmp_path: Path) -> None:
    """A mergekit-style recipe: models named only in the slices, ranges as ``layer_range``."""
    a, b, _ = llamas
    recipe = {
        "method": "slerp",
        "parameters": {"t": 0.4},
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 4]}, {"model": str(b), "layer_range": [2, 6]}]},
            {"sources": [{"model": str(b), "layer_range": [5, 6]}]},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def cli(config: Path, out: Path) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "hf_fusion", "merge", "--config", str(config), "--output", str(out), "--quiet"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr

    cli(path, tmp_path / "first")
    saved = Recipe.from_yaml(tmp_path / "first" / RECIPE_FILENAME)
    assert [str(m) for m in saved.models] == [str(a), str(b)] and saved.slices == Recipe.build(**recipe).slices
    cli(tmp_path / "first" / RECIPE_FILENAME, tmp_path / "second")
    first, second = _weights(tmp_path / "first"), _weights(tmp_path / "second")
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
    assert json.loads((tmp_path / "second" / "config.json").read_text())["num_hidden_layers"] == 5

    # the card's Reproduce command, run as written from another directory, makes the same model
    card = (tmp_path / "first" / "README.md").read_text()
    command = re.findall(r"```bash\n(.*?)```", card.split("## Reproduce", 1)[1], flags=re.S)[0].strip()
    assert str(tmp_path / "first" / RECIPE_FILENAME) in command
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path_with_cli = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    done = subprocess.run(
        command,
        shell=True,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": path_with_cli},
    )
    assert done.returncode == 0, done.stderr
    third = _weights(elsewhere / "first")
    assert third.keys() == first.keys() and all(torch.equal(first[n], third[n]) for n in first)


def test_a_pushed_sliced_card_fetches_its_recipe_before_merging() -> None:
    from hf_fusion.cards import reproduce_command

    recipe = Recipe.build(
        method="passthrough",
        slices=[
            {"sources": [{"model": "org/a", "layer_range": [0, 2]}]},
            {"sources": [{"model": "org/b", "layer_range": [1, 3]}]},
        ],
    )
    command = reproduce_command(recipe, "./m", repo_id="you/frank", folder="you/frank")
    assert command == (
        f"hf download you/frank {RECIPE_FILENAME} --local-dir . && hf-fusion merge --config {RECIPE_FILENAME} --output ./m"
    )


def test_a_range_beyond_a_hub_model_is_refused_from_its_headers(llamas, hub, tmp_path: Path) -> None:
    from hub_helpers import publish

    a, b, _ = llamas
    publish(hub, "fusion-lab/slice-a", a)
    publish(hub, "fusion-lab/slice-b", b)
    since = len(hub.state.requests)
    recipe = {
        "method": "passthrough",
        "slices": [_one("fusion-lab/slice-a", 0, 4), _one("fusion-lab/slice-b", 4, 12)],
    }
    with pytest.raises(RecipeError, match=r"layers \[4, 12\) of fusion-lab/slice-b, which has 6 layers"):
        _merge(recipe, tmp_path / "out")
    weights = [
        p for m, p, _, rng in hub.state.requests[since:] if m == "GET" and p.endswith(".safetensors") and rng is None
    ]
    assert weights == [] and not (tmp_path / "out").exists()


def test_layers_beyond_a_models_own_have_the_module_types_of_its_first_layer(llamas) -> None:
    """A fusing slice placed after copied layers fuses output layers the model does not have (DARE's
    ``only_on_linear_weights`` asks which of them are linear)."""
    from hf_fusion.architecture import parameter_module_types

    a, _, _ = llamas
    names = ["model.layers.9.self_attn.q_proj.weight", "model.layers.9.input_layernorm.weight"]
    assert parameter_module_types(a, names) == {names[0]: "Linear", names[1]: "LlamaRMSNorm"}


def test_slices_stream_row_slices_through_the_views(llamas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The views read what the engine asks for: under a budget of 64 elements, never more at once."""
    from hf_fusion.engine.slices import SlicedCheckpoint

    a, b, _ = llamas
    elements: list[int] = []
    read = SlicedCheckpoint.read_rows

    def spy(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        elements.append((stop - start) * self.entries[name].row_numel)
        read(self, name, start, stop, out)

    monkeypatch.setattr(SlicedCheckpoint, "read_rows", spy)
    recipe = {"method": "passthrough", "slices": [_one(a, 0, 4), _one(b, 2, 6)]}
    _merge(recipe, tmp_path / "out", budget_elements=64)
    assert elements and max(elements) <= 64  # the largest tensor has 128 x 32
    assert _weights(tmp_path / "out")["model.embed_tokens.weight"].shape == (128, 32)
