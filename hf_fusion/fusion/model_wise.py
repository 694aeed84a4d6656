"""Model-wise methods: the same inputs as the streaming path, loaded as modules, fused by the method, and saved with
``save_pretrained`` into an atomic output folder finished like every other.

A method whose output is a stock model assembled from its inputs' tensors returns a
:class:`~hf_fusion.modelwise.streamed.StreamedModel` instead, written tensor by tensor into the same folder.

Under several processes every process resolves and checks the inputs, loads the models and runs the method, which
splits its data over the processes (calibration batches, the examples of each adaptation batch) and adds up what
they computed, so every process ends with the same fused model. Downloads (models, task data) happen on the first
process of each machine first (the others then find them in the cache); only the main process writes the folder,
and its result reaches every process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from hf_fusion.engine.dtypes import TORCH_NAMES
from hf_fusion.errors import RecipeError
from hf_fusion.fusion.inputs import (
    Inputs,
    fetch_inputs,
    folders,
    input_bytes,
    pin,
    reference_is_base,
    resolve_inputs,
    with_architecture_base,
)
from hf_fusion.fusion.options import FusionOptions
from hf_fusion.fusion.output_folder import seal, write_side_files
from hf_fusion.fusion.remote_code import ship_modeling_code
from hf_fusion.fusion.result import MergeResult
from hf_fusion.fusion.validate import ValidatedRecipe
from hf_fusion.modelwise.base import ModelFusion, ModelwiseContext
from hf_fusion.modelwise.streamed import StreamedModel
from hf_fusion.output import AtomicFolder, check_free_space
from hf_fusion.recipe import OUTPUT_DTYPES, Recipe
from hf_fusion.runtime import LOCAL, Runtime
from hf_fusion.tasks.weights import ModelUnderTest, quiet_transformers

log = logging.getLogger(__name__)


def fuse_model_wise(
    checked: ValidatedRecipe,
    target: Path,
    options: FusionOptions,
    *,
    repo_id: str | None,
    runtime: Runtime = LOCAL,
) -> MergeResult:
    """Fuses whole models with a model-wise method on every process of ``runtime`` and writes the folder (with its
    card) atomically from the main process."""
    if options.allow_pickle:
        raise RecipeError(
            "model-wise methods load models with transformers from safetensors only; convert pickled checkpoints first."
        )
    method: ModelFusion[Any] = checked.spec.implementation(
        checked.params, num_models=len(checked.recipe.models), has_base=checked.uses_base
    )
    inputs, headers = resolve_inputs(checked, options)
    base = (inputs.base.label, inputs.base.config) if inputs.base is not None else None
    method.check_configs([(inputs.sources[i].label, inputs.sources[i].config) for i in inputs.experts], base)
    fetched = runtime.main_first(lambda: fetch_inputs(inputs, options))
    recipe = pin(checked.recipe, fetched)
    loadable = runtime.main_first(lambda: with_architecture_base(fetched, checked.recipe, options))
    context = build_context(
        recipe,
        loadable,
        show_progress=options.show_progress and runtime.is_main,
        runtime=runtime,
        mixed_precision=options.mixed_precision,
    )
    check_free_space(target, input_bytes(headers))
    model = method.fuse(context)
    return runtime.on_main(lambda: _write(model, method, context, loadable, recipe, target, options, repo_id))


def _write(
    model: torch.nn.Module | StreamedModel,
    method: ModelFusion[Any],
    context: ModelwiseContext,
    inputs: Inputs,
    recipe: Recipe,
    target: Path,
    options: FusionOptions,
    repo_id: str | None,
) -> MergeResult:
    """Saves the fused model, its side files and the method's extra files into the atomic output folder."""
    code = OUTPUT_DTYPES[recipe.dtype]
    if code is not None and not isinstance(model, StreamedModel):
        model = model.to(getattr(torch, TORCH_NAMES[code]))
    atomic = AtomicFolder(target, overwrite=options.overwrite)
    with atomic as temp:
        assert context.reference_folder is not None
        write_side_files(context.reference_folder, folders(inputs), temp)
        if isinstance(model, StreamedModel):
            count = model.write(
                temp, dtype=code, max_shard_bytes=options.max_shard_bytes, show_progress=options.show_progress
            )
        else:
            count = len(model.state_dict())
            with quiet_transformers():
                model.save_pretrained(temp, max_shard_size=options.max_shard_bytes)
        for name, text in method.extra_files.items():
            (temp / name).write_text(text)
        ship_modeling_code(temp)
        files = seal(atomic, temp, recipe, target=target, repo_id=repo_id)
    output_bytes = sum((target / f).stat().st_size for f in files if (target / f).is_file())
    return MergeResult(
        output=target,
        recipe=recipe,
        files=files,
        seconds=0.0,
        fused_tensors=count,
        copied_tensors=0,
        statistics_passes=0,
        output_bytes=output_bytes,
    )


def build_context(
    recipe: Recipe,
    inputs: Inputs,
    *,
    show_progress: bool,
    runtime: Runtime = LOCAL,
    mixed_precision: str = "no",
) -> ModelwiseContext:
    """The models as loadable modules, the architecture they share, and each model's task when there is a pool;
    computed on this process's own device of ``runtime``."""
    base_source = inputs.base
    base_folder = base_source.folder if base_source is not None else None
    expert_sources = [inputs.sources[i] for i in inputs.experts]
    experts = [
        ModelUnderTest(s.label, s.folder, base_folder if s.adapter_config is not None else None)  # type: ignore[arg-type]
        for s in expert_sources
    ]
    base = ModelUnderTest("base", base_folder) if base_folder is not None else None
    first = expert_sources[0]
    use_base_config = reference_is_base(base_source, first, recipe.heads)
    member_config = base_source.config if use_base_config else first.config  # type: ignore[union-attr]
    if member_config is None:
        raise RecipeError(f"{first.label} has no config.json, so its architecture is unknown.")
    if recipe.heads and not use_base_config:  # task models with per-task heads: fuse their shared backbone
        member_config = {k: v for k, v in member_config.items() if k != "architectures"}
    tasks = _tasks(recipe) if recipe.pool else None  # validate_recipe refused data methods without a pool
    return ModelwiseContext(
        experts=experts,
        member_config=member_config,
        base=base,
        heads=tuple(recipe.heads),
        tasks=tasks,
        device=runtime.device(recipe.device),
        show_progress=show_progress,
        reference_folder=base_folder if use_base_config else first.folder,
        runtime=runtime,
        mixed_precision=mixed_precision,
    )


def _tasks(recipe: Recipe) -> list[Any]:
    """Each model's task in its pool (matched by model path); an error when some model is not a pool expert."""
    from hf_fusion.catalog import get_pool

    pool = get_pool(recipe.pool)  # type: ignore[arg-type]
    names = [pool.task_of(ref.path) for ref in recipe.models]
    if any(n is None for n in names):
        missing = [str(ref) for ref, n in zip(recipe.models, names) if n is None]
        raise RecipeError(f"{missing[0]} is not an expert of pool {pool.name}, so its task data is unknown.")
    return [pool.task(n) for n in names]  # type: ignore[arg-type]
