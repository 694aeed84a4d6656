"""A recipe's ``slices`` turned into the engine's layer runs, checked as early as each fact is known.

From the recipe alone (:func:`check_slices`): the method fits the slices (``passthrough`` copies one-source
slices; a fusing method needs a slice with several sources), every source is an input, a fusing slice names every
input once. From configs and safetensors headers, before any download (:func:`check_ranges`): each range lies
within its model's layers. After fusing, the output config is given its new layer count (:func:`write_layer_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_fusion.engine.checkpoint import Checkpoint
from hf_fusion.engine.layers import count_layers
from hf_fusion.engine.slices import LayerRun
from hf_fusion.errors import RecipeError
from hf_fusion.model_files import config_layers, set_config_layers
from hf_fusion.recipe import ModelRef, OutputSlice, Recipe
from hf_fusion.registry import MethodKind, MethodSpec

PASSTHROUGH = "passthrough"
"""The method that copies what it is given: one model, or one-source slices stacked."""


def _key(ref: ModelRef) -> tuple[str, str | None]:
    """What identifies an input in a slice: its path and revision (the commit a recipe is pinned to aside)."""
    return ref.path, ref.revision


def _inputs(recipe: Recipe, uses_base: bool) -> list[ModelRef]:
    return [*([recipe.base] if uses_base and recipe.base else []), *recipe.models]


def check_slices(recipe: Recipe, spec: MethodSpec, uses_base: bool) -> None:
    """Refuses, before any I/O, slices the method cannot run and sources that are not inputs of the recipe."""
    if not recipe.slices:
        if spec.name == PASSTHROUGH and len(recipe.models) != 1:
            raise RecipeError(
                f"passthrough copies one model, or stacks layer ranges given as `slices`; got {len(recipe.models)} "
                "models and no slices. Add `slices` to the recipe, or choose a method that fuses."
            )
        return
    if spec.kind is MethodKind.MODEL_WISE:
        raise RecipeError(f"slices need a tensor-wise method; {spec.name!r} fuses whole models.")
    fusing = [n for n, s in enumerate(recipe.slices, 1) if len(s.sources) > 1]
    if spec.name == PASSTHROUGH and fusing:
        raise RecipeError(
            f"slice {fusing[0]} has {len(recipe.slices[fusing[0] - 1].sources)} sources, but passthrough copies "
            "layers: give each slice one source, or choose a method that fuses them (linear, slerp, ties...)."
        )
    if spec.name != PASSTHROUGH and not fusing:
        raise RecipeError(
            f"every slice has one source, so {spec.name!r} has nothing to fuse: use method passthrough to stack "
            "layer ranges, or list a range of every model in the slices to fuse."
        )
    inputs = _inputs(recipe, uses_base)
    keys = [_key(r) for r in inputs]
    twice = next((r for r, k in zip(inputs, keys) if keys.count(k) > 1), None)
    if twice is not None:
        raise RecipeError(f"{twice} is listed twice among the models and base; slices could not tell which is meant.")
    for number, out in enumerate(recipe.slices, 1):
        named = [_key(s.model) for s in out.sources]
        for source in out.sources:
            if _key(source.model) not in keys:
                raise RecipeError(_not_an_input(number, source.model, recipe, spec, uses_base))
            if named.count(_key(source.model)) > 1:
                raise RecipeError(f"slice {number} names {source.model} twice; a slice takes one range per model.")
        if len(out.sources) > 1 and len(named) < len(keys):
            missing = next(r for r, k in zip(inputs, keys) if k not in named)
            raise RecipeError(
                f"slice {number} fuses layers but has no range of {missing}: a fusing slice lists one range for "
                f"every model{' and the base' if uses_base else ''} ({', '.join(str(r) for r in inputs)})."
            )


def _not_an_input(number: int, ref: ModelRef, recipe: Recipe, spec: MethodSpec, uses_base: bool) -> str:
    if recipe.base is not None and _key(ref) == _key(recipe.base) and not uses_base:
        return f"slice {number} takes layers from the base {ref}, which {spec.name!r} does not read; list it in models."
    return f"slice {number} takes layers from {ref}, which is not among the recipe's models; add it to `models`."


def layer_runs(slices: Sequence[OutputSlice], refs: Sequence[ModelRef], read: Sequence[int]) -> list[LayerRun]:
    """The slices as layer runs over checkpoint positions: ``refs[p]`` is the input at position ``p`` and ``read``
    the positions the plan reads (the models, and the base when the method reads it)."""
    position = {_key(refs[p]): p for p in read}
    return [
        LayerRun(tuple((position[_key(s.model)], s.layers[0]) for s in out.sources), out.num_layers) for out in slices
    ]


def input_layers(header: Checkpoint | None, config: dict[str, Any] | None) -> int | None:
    """How many layers an input has: counted in its tensor names, else declared by its config (None if neither)."""
    if header is not None:
        return count_layers(header.entries)
    return config_layers(config)


def check_ranges(runs: Sequence[LayerRun], labels: Sequence[str], layers: Sequence[int | None]) -> None:
    """Refuses a range beyond its model's layers (``layers[p]`` for position ``p``; None when unknown yet)."""
    for number, run in enumerate(runs, 1):
        for p, start in run.starts:
            total = layers[p]
            if total is not None and start + run.length > total:
                raise RecipeError(
                    f"slice {number} takes layers [{start}, {start + run.length}) of {labels[p]}, which has "
                    f"{total} layers."
                )


def layer_origins(runs: Sequence[LayerRun]) -> list[tuple[int, int]]:
    """For each output layer, the position and layer it takes its per-layer config from (a fused run's first
    source)."""
    return [(run.starts[0][0], run.starts[0][1] + i) for run in runs for i in range(run.length)]


def write_layer_config(folder: Path, runs: Sequence[LayerRun], configs: Sequence[dict[str, Any] | None]) -> None:
    """The output config's layer count and per-layer lists, for the sliced stack."""
    set_config_layers(folder, [(configs[p], j) for p, j in layer_origins(runs)])
