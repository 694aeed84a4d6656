"""The merge form comes from the registry, and what it writes is a recipe the pipeline accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_fusion.catalog import get_pool
from hf_fusion.errors import RecipeError
from hf_fusion.fusion import as_recipe, validate_recipe
from hf_fusion.registry import all_methods, get_method
from hf_fusion.space.app import SpaceApp, SpaceLimits
from hf_fusion.space.form import (
    POOL_SOURCE,
    REPO_SOURCE,
    param_slots,
    per_layer_methods,
    recipe_fields,
    slider_range,
    to_yaml,
    widget_kind,
    widget_value,
)

TWO_MODEL_METHODS = {"linear_interpolation", "slerp"}


def test_every_parameter_gets_a_widget_matching_its_registry_entry() -> None:
    slots = param_slots(all_methods())
    assert {(s.method, s.info.name) for s in slots} == {(m.name, p.name) for m in all_methods() for p in m.parameters()}
    kinds = {(s.method, s.info.name): widget_kind(s.info) for s in slots}
    assert kinds[("ties_merging", "merge_func")] == "dropdown"
    assert kinds[("ties_merging", "scaling_factor")] == "slider"
    assert kinds[("dare_task_arithmetic", "only_on_linear_weights")] == "checkbox"
    assert kinds[("weighted_average", "weights")] == "yaml"
    assert kinds[("slerp", "epsilon")] == "number"  # no upper bound: no slider
    for slot in slots:
        if widget_kind(slot.info) == "slider":
            lo, hi = slider_range(slot.info)  # type: ignore[misc]
            assert (slot.info.minimum is None or lo >= slot.info.minimum) and (
                slot.info.maximum is None or hi <= slot.info.maximum
            )
            assert lo <= slot.info.default <= hi


def _form(method: str, per_layer: dict[str, str] | None = None) -> dict:
    """The recipe of the default form on the built-in pool, with the given per-layer boxes."""
    slots = param_slots(all_methods())
    return recipe_fields(
        source=POOL_SOURCE,
        pool=get_pool("minilm-text3"),
        models_text="",
        base="",
        method=method,
        dtype="auto",
        slots=slots,
        values=[s.info.default for s in slots],
        per_layer=per_layer,
    )


@pytest.mark.parametrize("method", [m.name for m in all_methods()])
def test_the_default_form_is_a_valid_recipe_for_every_method(method: str) -> None:
    fields = _form(method)
    recipe = as_recipe(yaml.safe_load(yaml.safe_dump(fields)), {})
    if method in TWO_MODEL_METHODS:  # a 3-expert pool is the wrong shape for them, and the form says so
        with pytest.raises(RecipeError, match="exactly two models"):
            validate_recipe(recipe)
        return
    if method == "passthrough":  # copies one model; several need slices, which the form does not offer
        with pytest.raises(RecipeError, match="passthrough copies one model"):
            validate_recipe(recipe)
        return
    if get_method(method).max_models == 1:  # depth up-scaling grows one model
        with pytest.raises(RecipeError, match="at most 1 model"):
            validate_recipe(recipe)
        return
    checked = validate_recipe(recipe)
    assert checked.recipe.method == method
    assert checked.recipe.parameters == get_method(method).defaults()
    assert len(checked.recipe.models) == 3 and checked.recipe.pool == "minilm-text3"


def test_repo_ids_form_and_typed_values() -> None:
    slots = [s for s in param_slots(all_methods()) if s.method == "weighted_average"]
    values = [widget_value(s, v) for s, v in zip(slots, ["[0.7, 0.3]", True])]
    assert values == [[0.7, 0.3], True]
    fields = recipe_fields(
        source=REPO_SOURCE,
        pool=None,
        models_text="org/a, org/b@v1\norg/c",
        base=" org/base ",
        method="weighted_average",
        dtype="bfloat16",
        slots=slots,
        values=["[0.5, 0.3, 0.2]", True],
    )
    assert fields == {
        "method": "weighted_average",
        "models": ["org/a", "org/b@v1", "org/c"],
        "base": "org/base",
        "parameters": {"weights": [0.5, 0.3, 0.2], "normalize": True},
        "dtype": "bfloat16",
    }
    with pytest.raises(RecipeError, match="weights"):
        widget_value(slots[0], "[0.5, ")


def _public_app(tmp_path: Path) -> SpaceApp:
    return SpaceApp(
        root=tmp_path / "sessions",
        files_root=tmp_path / "files",
        in_space=True,
        allow_local_paths=False,
        limits=SpaceLimits(),
    )


def test_a_shared_space_refuses_server_paths(tmp_path: Path) -> None:
    app = _public_app(tmp_path)
    for recipe in (
        f"method: simple_average\nmodels: [{tmp_path}]\n",
        "method: simple_average\nmodels: [/etc]\n",
        "method: task_arithmetic\nmodels: [org/a]\nbase: ./base\n",
    ):
        with pytest.raises(RecipeError, match="cannot be used on this Space"):
            app._prepare_merge(recipe, False, 0)
    recipe, settings, tasks = app._prepare_merge("method: ties_merging\npool: minilm-text3\n", True, 50)
    assert tasks == ["bbc_news", "twitter_sentiment", "sms_spam"] and settings.limit == 50
    assert settings.metrics == "bundled"
    assert [m.path for m in recipe.models] == [f"builtin:minilm-text3/{t}" for t in tasks]
    assert not (tmp_path / "sessions").exists() and not (tmp_path / "files").exists()  # nothing made for checks


def test_the_per_layer_box_enters_gradients_and_conditions_that_resolve_per_tensor() -> None:
    names = {s.name for s in per_layer_methods(all_methods())}
    assert {"task_arithmetic", "ties_merging", "slerp"} <= names
    assert "regmean" not in names and "simple_average" not in names  # whole-model, or nothing to vary
    text = "scaling_factor:\n  - {filter: attention, value: [0.2, 0.6]}\n  - {value: 0.4}\n"
    other = {"ties_merging": "threshold: [1, 2]"}  # another method's box is not the chosen method's
    fields = _form("task_arithmetic", {"task_arithmetic": text, **other})
    assert fields["parameters"]["scaling_factor"] == [
        {"filter": "attention", "value": [0.2, 0.6]},
        {"value": 0.4},
    ]
    checked = validate_recipe(as_recipe(yaml.safe_load(to_yaml(fields)), {}))
    schedule = checked.schedule
    assert schedule.varies
    attention = "encoder.layer.3.attention.self.query.weight"
    assert schedule.resolve(attention, 0.5).scaling_factor == pytest.approx(0.4)
    assert schedule.resolve(attention, 1.0).scaling_factor == pytest.approx(0.6)
    assert schedule.resolve("encoder.layer.3.output.dense.weight", 1.0).scaling_factor == pytest.approx(0.4)
    assert checked.recipe.parameters["scaling_factor"] == fields["parameters"]["scaling_factor"]


def test_the_per_layer_box_refuses_what_is_not_a_parameter_setting() -> None:
    with pytest.raises(RecipeError, match="no parameter 'scale'.*scaling_factor"):
        _form("task_arithmetic", {"task_arithmetic": "scale: [0, 1]"})
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        _form("task_arithmetic", {"task_arithmetic": "[0, 1]"})
    with pytest.raises(RecipeError, match="aliases"):
        _form("task_arithmetic", {"task_arithmetic": "scaling_factor: &a [0, 1]\nx: *a"})
    fields = _form("ties_merging", {"ties_merging": "threshold: [20, 150]"})  # out of range at a knot
    with pytest.raises(RecipeError, match="threshold"):
        validate_recipe(as_recipe(yaml.safe_load(to_yaml(fields)), {}))


def test_the_space_form_reads_the_chosen_methods_per_layer_box(tmp_path: Path) -> None:
    app = _public_app(tmp_path)
    boxes = {spec.name: "" for spec in app.per_layer_specs}
    boxes["slerp"] = "t: [0, 0.5, 0.3, 0.7, 1]"
    defaults = [s.info.default for s in app.slots]
    text = app.form_to_yaml(REPO_SOURCE, "", "org/a\norg/b", "org/base", "slerp", "auto", *defaults, *boxes.values())
    assert yaml.safe_load(text)["parameters"]["t"] == [0, 0.5, 0.3, 0.7, 1]


def test_deeply_nested_yaml_is_a_recipe_error_not_a_crash() -> None:
    from hf_fusion.space.form import parse_recipe_yaml, per_layer_values

    deep = "[" * 20_000
    with pytest.raises(RecipeError, match="nest"):
        per_layer_values(get_method("task_arithmetic"), deep)
    with pytest.raises(RecipeError, match="nest"):
        parse_recipe_yaml("method: " + deep)
