"""The recipe, checked before any I/O: method, parameters, model count, data, slices, device."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_fusion.errors import RecipeError
from hf_fusion.fusion.mergekit import is_mergekit_config, recipe_fields
from hf_fusion.fusion.slicing import check_slices
from hf_fusion.fusion.tokenizer_choice import check_tokenizer_fields
from hf_fusion.recipe import Recipe, read_yaml_mapping
from hf_fusion.registry import BaseUse, DataNeed, MethodKind, MethodSpec, get_method
from hf_fusion.tensor_parameters import ParameterSchedule, build_schedule


@dataclass(frozen=True)
class ValidatedRecipe:
    """A recipe whose method, parameters and model count have been checked (no I/O yet)."""

    recipe: Recipe
    spec: MethodSpec
    params: Any
    uses_base: bool
    schedule: ParameterSchedule
    """The parameters per tensor (gradients, filters); ``params`` is its representative, for the method's layout."""


def validate_recipe(recipe: Recipe) -> ValidatedRecipe:
    """Checks the method, its parameters and the pool shape; returns the recipe with canonical names and defaults."""
    spec = get_method(recipe.method)
    schedule = parameter_schedule(spec, recipe.parameters)
    params = schedule.base
    has_base = recipe.base is not None
    uses_base = has_base and spec.base is not BaseUse.UNUSED
    spec.validate_pool(params, len(recipe.models), uses_base)
    if spec.data is not DataNeed.NONE and not recipe.pool:
        raise RecipeError(
            f"method {spec.name!r} needs {spec.data.value} data from each model's task: pass --pool "
            "(a catalog pool or a pool file) so the tasks and their datasets are known."
        )
    check_slices(recipe, spec, uses_base)
    check_device(recipe.device)
    check_tokenizer_fields(recipe, model_wise=spec.kind is MethodKind.MODEL_WISE)
    check_output_format(recipe, spec)
    canonical = recipe.replace(method=spec.name, parameters=schedule.recipe_parameters())
    return ValidatedRecipe(canonical, spec, params, uses_base, schedule)


def parameter_schedule(spec: MethodSpec, raw: Mapping[str, Any]) -> ParameterSchedule:
    """The method's parameters, any of which may vary by tensor except those its implementation fixes."""
    if spec.kind is MethodKind.TENSOR_WISE:
        return build_schedule(spec, raw, spec.implementation.fixed_for)
    return build_schedule(spec, raw)


def check_output_format(recipe: Recipe, spec: MethodSpec) -> None:
    """What an adapter output cannot be, known from the recipe alone: a model-wise method's architecture, one model
    per input, re-sliced layers or a changed vocabulary; and a rank without an adapter to apply it to."""
    if recipe.output_format == "dense":
        if recipe.rank is not None:
            raise RecipeError(
                "--rank sets the rank of an adapter output: add --output-format adapter, or leave it out."
            )
        return
    refusal = None
    if spec.kind is MethodKind.MODEL_WISE:
        refusal = f"{spec.name} builds a new architecture (or trains merging weights on data), not a weight delta"
    elif spec.implementation.outputs_per_model:
        refusal = f"{spec.name} fuses one model per input model"
    elif recipe.slices:
        refusal = "layer slices change the architecture"
    elif recipe.tokenizer or recipe.chat_template:
        refusal = "a fused tokenizer changes the embeddings' rows"
    if refusal:
        raise RecipeError(
            f"--output-format adapter needs a weight delta on the base that a LoRA adapter can carry; {refusal}. "
            "Write it dense (the default)."
        )
    if recipe.base is None:
        raise RecipeError("--output-format adapter needs --base: the model the LoRA adapters were trained on.")


def check_device(device: str) -> None:
    """A device this process can compute on (see :meth:`hf_fusion.runtime.Runtime.device`)."""
    from hf_fusion.runtime import current

    current().device(device)


def as_recipe(recipe: Recipe | str | Path | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> Recipe:
    """Builds a recipe from an object, a YAML path or a mapping, with keyword overrides on top."""
    fields: dict[str, Any] = {}
    if isinstance(recipe, Recipe):
        fields = recipe.model_dump()
    elif isinstance(recipe, (str, Path)):
        fields = recipe_file_fields(Path(recipe))
    elif isinstance(recipe, Mapping):
        fields = dict(recipe)
    elif recipe is not None:
        raise RecipeError(f"cannot build a recipe from {type(recipe).__name__}.")
    params = dict(fields.get("parameters") or {})
    params.update(overrides.get("parameters") or {})
    fields.update({k: v for k, v in overrides.items() if v is not None and k not in ("parameters", "tasks")})
    fields["parameters"] = params
    if fields.get("pool") and not fields.get("models"):
        fields.update(pool_models(fields["pool"], overrides.get("tasks"), fields))
    return Recipe.build(**fields)


def recipe_file_fields(path: Path) -> dict[str, Any]:
    """A recipe file's fields: hf-fusion's recipe, or mergekit's configuration format (``merge_method``) mapped
    onto it."""
    data = read_yaml_mapping(path)
    if is_mergekit_config(data):
        return Recipe.build(**recipe_fields(data)).model_dump()
    return Recipe.build(**data).model_dump()


def pool_models(name: str, tasks: list[str] | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Base, experts and heads of a catalog pool (or pool file), for the selected tasks."""
    from hf_fusion.catalog import get_pool

    pool = get_pool(name)
    specs = pool.select(tasks)
    return {
        "models": [pool.experts[s.name] for s in specs],
        "base": fields.get("base") or pool.base,
        "heads": fields.get("heads") or list(pool.heads),
    }
