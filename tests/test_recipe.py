"""Recipes: parsing model references, YAML round trips, helpful errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_fusion.errors import RecipeError
from hf_fusion.recipe import ModelRef, Recipe


def test_model_references(tmp_path: Path) -> None:
    assert ModelRef.parse("org/name@v1.0") == ModelRef(path="org/name", revision="v1.0")
    assert ModelRef.parse("org/name") == ModelRef(path="org/name")
    odd = tmp_path / "my@model"
    odd.mkdir()
    assert ModelRef.parse(str(odd)) == ModelRef(path=str(odd))  # an existing path is never split
    assert str(ModelRef.parse("a/b@main")) == "a/b@main"
    with pytest.raises(RecipeError):
        ModelRef.parse("a/b@")


def test_yaml_round_trip(tmp_path: Path) -> None:
    recipe = Recipe.build(
        method="ties",
        models=["a/x@r1", "./local"],
        base="a/base",
        parameters={"threshold": 30},
        dtype="bf16",
        exclude=["classifier.*"],
    )
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    again = Recipe.from_yaml(path)
    assert again == recipe
    assert again.models[0].revision == "r1" and again.dtype == "bfloat16"


def test_resolved_commits_round_trip(tmp_path: Path) -> None:
    recipe = Recipe.build(method="ties", models=[{"path": "a/x", "revision": "main", "commit": "0" * 40}, "a/y"])
    text = recipe.to_yaml()
    assert "commit: '0000" in text or "commit: 0000" in text
    path = tmp_path / "r.yaml"
    path.write_text(text)
    again = Recipe.from_yaml(path)
    assert again.models[0].commit == "0" * 40 and again.models[0].pinned == "0" * 40
    assert again.models[1].pinned is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "ties", "models": []}, "models"),
        ({"method": "ties", "models": ["a"], "dtype": "int8"}, "dtype"),
        ({"method": "ties", "modles": ["a"]}, "Did you mean 'models'"),
    ],
)
def test_invalid_recipes(fields: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.build(**fields)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read recipe"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("method: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        Recipe.from_yaml(tmp_path / "list.yaml")


def test_slices_read_mergekit_spellings_and_name_their_models(tmp_path: Path) -> None:
    """``layer_range`` is read as ``layers``; without ``models``, the slices' models (not the base) are the models."""
    recipe = Recipe.build(
        method="slerp",
        base="org/base",
        slices=[
            {"sources": [{"model": "org/a", "layer_range": [0, 4]}, {"model": "org/base", "layer_range": [0, 4]}]},
            {"sources": [{"model": "org/b@v1", "layers": [4, 8]}]},
        ],
    )
    assert [str(m) for m in recipe.models] == ["org/a", "org/b@v1"]
    assert recipe.slices[1].sources[0].layers == (4, 8) and recipe.slices[1].num_layers == 4
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path) == recipe
