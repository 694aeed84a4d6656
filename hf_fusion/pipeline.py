"""The one path every fused model takes: recipe -> validate -> fuse -> write.

Everything that can be checked without reading weights is checked first (method, parameters, model count, output
folder, device), then headers and configs (architectures, tensor names and shapes, disk space), and only then is
any tensor data read.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from hf_fusion import __version__
from hf_fusion.architecture import parameter_module_types
from hf_fusion.engine.checkpoint import Checkpoint, open_checkpoint
from hf_fusion.engine.dtypes import OUTPUT_DTYPES, TORCH_NAMES
from hf_fusion.engine.plan import FusionPlan, build_plan
from hf_fusion.engine.stream import DEFAULT_BUDGET_ELEMENTS, StreamingEngine
from hf_fusion.engine.writer import DEFAULT_MAX_SHARD_BYTES, ShardedSafetensorsWriter
from hf_fusion.errors import InsufficientResourcesError, RecipeError
from hf_fusion.model_files import (
    check_same_architecture,
    copy_side_files,
    local_folder,
    read_config,
    same_architecture,
    set_config_dtype,
)
from hf_fusion.output import AtomicFolder, check_free_space, check_output_folder
from hf_fusion.recipe import RECIPE_FILENAME, Recipe
from hf_fusion.registry import BaseUse, MethodSpec, get_method

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeResult:
    """What a fusion produced."""

    output: Path
    recipe: Recipe
    files: list[str]
    seconds: float
    fused_tensors: int
    copied_tensors: int
    statistics_passes: int
    output_bytes: int


@dataclass(frozen=True)
class ValidatedRecipe:
    """A recipe whose method, parameters and model count have been checked (no I/O yet)."""

    recipe: Recipe
    spec: MethodSpec
    params: Any
    uses_base: bool


def validate_recipe(recipe: Recipe) -> ValidatedRecipe:
    """Checks the method, its parameters and the pool shape; returns the recipe with canonical names and defaults."""
    spec = get_method(recipe.method)
    params = spec.validate_params(recipe.parameters)
    has_base = recipe.base is not None
    if spec.base is BaseUse.UNUSED and has_base:
        log.warning("method %s does not use a base model; %s is ignored", spec.name, recipe.base)
    uses_base = has_base and spec.base is not BaseUse.UNUSED
    spec.validate_pool(params, len(recipe.models), uses_base)
    _check_device(recipe.device)
    canonical = recipe.replace(method=spec.name, parameters=params.model_dump())
    return ValidatedRecipe(canonical, spec, params, uses_base)


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RecipeError(f"unknown device {device!r}; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device {device!r} was requested but no CUDA device is available.")
    if dev.type not in ("cpu", "cuda"):
        raise RecipeError(f"device {device!r} is not supported; use cpu or cuda.")


def as_recipe(recipe: Recipe | str | Path | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> Recipe:
    """Builds a recipe from an object, a YAML path or a mapping, with keyword overrides on top."""
    fields: dict[str, Any] = {}
    if isinstance(recipe, Recipe):
        fields = recipe.model_dump()
    elif isinstance(recipe, (str, Path)):
        fields = Recipe.from_yaml(recipe).model_dump()
    elif isinstance(recipe, Mapping):
        fields = dict(recipe)
    elif recipe is not None:
        raise RecipeError(f"cannot build a recipe from {type(recipe).__name__}.")
    params = dict(fields.get("parameters") or {})
    params.update(overrides.get("parameters") or {})
    fields.update({k: v for k, v in overrides.items() if v is not None and k != "parameters"})
    fields["parameters"] = params
    return Recipe.build(**fields)


def merge(
    recipe: Recipe | str | Path | Mapping[str, Any] | None = None,
    /,
    *,
    models: list[str] | None = None,
    base: str | None = None,
    method: str | None = None,
    output: str | Path | None = None,
    dtype: str | None = None,
    device: str | None = None,
    exclude: list[str] | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    budget_elements: int = DEFAULT_BUDGET_ELEMENTS,
    **parameters: Any,
) -> MergeResult:
    """Fuses models into a ``from_pretrained``-ready folder.

    ``merge(recipe)`` takes a :class:`Recipe`, a YAML path or a mapping; ``merge(models=[...], base=..., method=...,
    output=..., **params)`` builds one from keywords (keywords also override a given recipe).
    """
    overrides = {
        "models": models, "base": base, "method": method, "output": str(output) if output else None,
        "dtype": dtype, "device": device, "exclude": exclude, "parameters": parameters,
    }
    checked = validate_recipe(as_recipe(recipe, overrides))
    if not checked.recipe.output:
        raise RecipeError("no output folder: pass --output (output=...).")
    target = Path(checked.recipe.output).expanduser()
    check_output_folder(target, overwrite=overwrite)
    _check_output_is_not_an_input(target, checked.recipe)

    started = time.perf_counter()
    checkpoints: list[Checkpoint] = []
    try:
        plan, folders = _open_and_plan(checked, checkpoints, allow_pickle=allow_pickle)
        check_free_space(target, plan.output_bytes)
        method_impl = checked.spec.implementation(
            checked.params, num_models=len(plan.experts), has_base=checked.uses_base
        )
        _check_memory(plan, method_impl.elementwise, budget_elements)
        module_types = None
        if method_impl.needs_module_types:
            module_types = parameter_module_types(folders[plan.experts[0]], [t.key for t in plan.fused])
        engine = StreamingEngine(
            plan, method_impl, uses_base=checked.uses_base, device=checked.recipe.device,
            budget_elements=budget_elements, show_progress=show_progress, module_types=module_types,
        )
        atomic = AtomicFolder(target, overwrite=overwrite)
        with atomic as temp:
            writer = ShardedSafetensorsWriter(
                temp, plan.output_tensors(), stem=_output_stem(plan), max_shard_bytes=max_shard_bytes,
                metadata={"fused_by": f"hf-fusion {__version__}", "fusion_method": checked.spec.name},
            )
            try:
                engine.run(writer)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            _write_side_files(checked.recipe, plan, folders, temp)
            files = sorted(os.listdir(temp))
            atomic.commit()
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    return MergeResult(
        output=target,
        recipe=checked.recipe,
        files=files,
        seconds=time.perf_counter() - started,
        fused_tensors=len(plan.fused),
        copied_tensors=len(plan.tensors) - len(plan.fused),
        statistics_passes=engine.passes,
        output_bytes=plan.output_bytes,
    )


def _check_output_is_not_an_input(target: Path, recipe: Recipe) -> None:
    """Refuses an output folder that is, or contains, one of the models being read."""
    out = target.resolve()
    for ref in [*recipe.models, *([recipe.base] if recipe.base else [])]:
        path = Path(ref.path).expanduser()
        if path.exists():
            model = path.resolve()
            if model == out or out in model.parents:
                raise RecipeError(f"the output folder {target} would replace the input model {ref}; choose another.")


def _open_and_plan(
    checked: ValidatedRecipe, checkpoints: list[Checkpoint], *, allow_pickle: bool
) -> tuple[FusionPlan, list[Path]]:
    """Reads configs and safetensors headers (never tensor data) and builds the plan."""
    recipe = checked.recipe
    refs = ([recipe.base] if checked.uses_base and recipe.base else []) + list(recipe.models)
    folders = [local_folder(ref) for ref in refs]
    labels = [str(ref) for ref in refs]
    configs = [read_config(folder) for folder in folders]
    base_index = 0 if checked.uses_base else None
    experts = list(range(1 if checked.uses_base else 0, len(refs)))
    check_same_architecture([labels[i] for i in experts], [configs[i] for i in experts])
    for folder, label in zip(folders, labels):
        checkpoints.append(open_checkpoint(folder, label, allow_pickle=allow_pickle))
    reference = experts[0]
    if base_index is not None and same_architecture(configs[base_index], configs[experts[0]]):
        reference = base_index
    out_dtype = OUTPUT_DTYPES[recipe.dtype]
    plan = build_plan(
        checkpoints, base=base_index, experts=experts, uses_base=checked.uses_base, reference=reference,
        exclude=recipe.exclude, out_dtype=out_dtype,
    )
    return plan, folders


def _output_stem(plan: FusionPlan) -> str:
    stem = plan.checkpoints[plan.reference].weights_stem
    return "model" if stem in ("pytorch_model", "") else stem


def _write_side_files(recipe: Recipe, plan: FusionPlan, folders: list[Path], dest: Path) -> None:
    reference = folders[plan.reference]
    others = [folders[i] for i in ([plan.base] if plan.base is not None else []) + plan.experts]
    copy_side_files(reference, [f for f in others if f != reference], dest)
    code = OUTPUT_DTYPES[recipe.dtype]
    if code is not None:
        set_config_dtype(dest, TORCH_NAMES[code])
    (dest / RECIPE_FILENAME).write_text(
        f"# Fused with hf-fusion {__version__}. Reproduce: hf-fusion merge --config {RECIPE_FILENAME}\n"
        + recipe.to_yaml()
    )


def _check_memory(plan: FusionPlan, elementwise: bool, budget_elements: int) -> None:
    """Refuses a whole-tensor method whose largest tensor, times the inputs, cannot fit in memory."""
    sources = len(next(iter(plan.fused)).reads)
    if elementwise:
        needed = 4 * budget_elements * 6
    else:
        largest = max(plan.checkpoints[i].entries[n].numel for t in plan.fused for i, n in t.reads.items())
        needed = 4 * largest * sources * 4
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    log.debug("estimated working memory: %.2f GB", needed / 1e9)
    if total and needed > total:
        raise InsufficientResourcesError(
            f"this method processes whole tensors: about {needed / 1e9:.1f} GB of working memory for the largest "
            f"one, more than this machine's {total / 1e9:.1f} GB."
        )
