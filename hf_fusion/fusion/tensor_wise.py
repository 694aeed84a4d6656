"""Tensor-wise methods: the inputs' tensors streamed through the engine into sharded safetensors files."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hf_fusion.architecture import parameter_module_types
from hf_fusion.engine.checkpoint import Checkpoint
from hf_fusion.engine.layers import count_layers, layer_positions
from hf_fusion.engine.plan import FusionPlan, build_plan
from hf_fusion.engine.slices import LayerRun, output_positions, slice_checkpoints
from hf_fusion.engine.stream import GPU_BUDGET_ELEMENTS, StreamingEngine
from hf_fusion.engine.writer import ShardedSafetensorsWriter
from hf_fusion.errors import InsufficientResourcesError, ParameterError
from hf_fusion.fusion.inputs import Inputs, fetch_inputs, pin, reference_index, resolve_inputs
from hf_fusion.fusion.options import FusionOptions
from hf_fusion.fusion.output_folder import output_names, seal, write_side_files
from hf_fusion.fusion.remote_code import ship_modeling_code
from hf_fusion.fusion.result import MergeResult
from hf_fusion.fusion.slicing import layer_runs, write_layer_config
from hf_fusion.fusion.tokenizer_output import write_tokenizer
from hf_fusion.fusion.validate import ValidatedRecipe
from hf_fusion.output import AtomicFolder, check_free_space
from hf_fusion.recipe import OUTPUT_DTYPES, Recipe
from hf_fusion.sources import open_source
from hf_fusion.version import __version__

log = logging.getLogger(__name__)


def fuse_tensor_wise(
    checked: ValidatedRecipe, target: Path, options: FusionOptions, *, repo_id: str | None
) -> MergeResult:
    """Resolves and checks the inputs, downloads them, and writes the fused folder (with its card) atomically."""
    method = checked.spec.implementation(
        checked.params, num_models=len(checked.recipe.models), has_base=checked.uses_base
    )
    inputs, headers = resolve_inputs(checked, options)
    check_memory(headers, method.elementwise, options.budget_elements)
    check_parameters(checked, headers)
    inputs = fetch_inputs(inputs, options)
    recipe = pin(checked.recipe, inputs)
    checkpoints: list[Checkpoint] = []
    try:
        plan = open_plan(checked, inputs, checkpoints, options)
        copies = len(recipe.models) if method.outputs_per_model else 1
        check_free_space(target, plan.output_bytes * copies)
        engine = make_engine(plan, method, checked, inputs, recipe, options)
        atomic = AtomicFolder(target, overwrite=options.overwrite)
        with atomic as temp:
            folders = _model_folders(temp, recipe, method.outputs_per_model)
            write_weights(engine, plan, folders, checked.spec.name, options)
            sources = [s.folder for s in inputs.sources]
            others = [sources[i] for i in ([plan.base] if plan.base is not None else []) + plan.experts]
            for folder in folders:
                write_side_files(sources[plan.reference], others, folder, recipe.dtype)  # type: ignore[arg-type]
                ship_modeling_code(folder)  # a fused ensemble or mixture keeps its code beside its auto_map
                if recipe.slices:
                    write_layer_config(folder, _runs(recipe, inputs), [s.config for s in inputs.sources])
                write_tokenizer(inputs.vocabulary, folder)
            notes = method.notes()
            for line in notes:
                log.info("%s: %s", checked.spec.name, line)
            files = seal(atomic, temp, recipe, target=target, repo_id=repo_id, notes=notes)
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()
    return MergeResult(
        output=target,
        recipe=recipe,
        files=files,
        seconds=0.0,
        fused_tensors=len(plan.fused),
        copied_tensors=len(plan.tensors) - len(plan.fused),
        statistics_passes=engine.passes,
        output_bytes=plan.output_bytes * copies,
    )


def open_plan(
    checked: ValidatedRecipe, inputs: Inputs, checkpoints: list[Checkpoint], options: FusionOptions
) -> FusionPlan:
    """Opens the fetched checkpoints (adapters as dense models) into ``checkpoints`` and builds the full plan, tied
    tensors included; with a vocabulary alignment the plan reads them re-indexed onto the output's tokens."""
    sources = inputs.sources
    base = open_source(sources[0], allow_pickle=options.allow_pickle, lora_base=None) if inputs.has_base else None
    checkpoints += [base] if base is not None else []
    checkpoints += [open_source(sources[i], allow_pickle=options.allow_pickle, lora_base=base) for i in inputs.experts]
    reference = reference_index(inputs, checked.recipe.heads)
    views = inputs.vocabulary.views(checkpoints) if inputs.vocabulary is not None else checkpoints
    copy_from = None
    if checked.recipe.slices:
        runs = _runs(checked.recipe, inputs)
        sliced = slice_checkpoints(views, runs, inputs.read)  # type: ignore[arg-type]
        views, copy_from = sliced.views, sliced.copy_from
        if all(run.copies for run in runs):  # config, tokenizer and order follow the input of the embeddings
            reference = runs[0].starts[0][0]
    return build_plan(
        views,  # type: ignore[arg-type]
        base=0 if inputs.base_is_input else None,
        experts=inputs.experts,
        uses_base=inputs.base_is_input,
        reference=reference,
        exclude=checked.recipe.exclude,
        heads=checked.recipe.heads,
        out_dtype=OUTPUT_DTYPES[checked.recipe.dtype],
        copy_from=copy_from,
    )


def check_parameters(checked: ValidatedRecipe, headers: list[Checkpoint | None]) -> None:
    """Resolves per-tensor parameters over the first model's tensor names, from headers, before any download: a
    value out of range or a gradient with more knots than layers is refused here, and filters that match no tensor
    are reported."""
    schedule = checked.schedule
    known = [h for h in headers if h is not None]
    if not schedule.varies or not known:
        return
    names = list(known[-1].entries)  # the last header is the recipe's last model; the base comes first
    slices = checked.recipe.slices
    layers = sum(s.num_layers for s in slices) if slices else count_layers(names)
    for key, knots in schedule.gradient_lengths().items():
        if layers and knots > layers:
            raise ParameterError(
                f"parameter {key!r} has a gradient of {knots} values, but the models have {layers} layers: "
                "a gradient takes at most one value per layer."
            )
    schedule.resolve_all(layer_positions(names))


def tensor_parameters(checked: ValidatedRecipe, plan: FusionPlan) -> dict[str, Any]:
    """Each fused tensor's parameters, by engine key, when the recipe varies them by tensor."""
    if not checked.schedule.varies:
        return {}
    positions = output_positions([t.name for t in plan.fused], checked.recipe.slices)
    return {t.key: checked.schedule.resolve(t.name, positions[t.name]) for t in plan.fused}


def _runs(recipe: Recipe, inputs: Inputs) -> list[LayerRun]:
    return layer_runs(recipe.slices or [], [s.ref for s in inputs.sources], inputs.read)


def make_engine(
    plan: FusionPlan, method: Any, checked: ValidatedRecipe, inputs: Inputs, recipe: Recipe, options: FusionOptions
) -> StreamingEngine:
    module_types = None
    if method.needs_module_types:
        module_types = parameter_module_types(
            inputs.sources[plan.experts[0]].folder,  # type: ignore[arg-type]
            [t.key for t in plan.fused],
        )
    return StreamingEngine(
        plan,
        method,
        uses_base=checked.uses_base,
        device=recipe.device,
        budget_elements=options.budget_elements,
        show_progress=options.show_progress,
        module_types=module_types,
        parameters=tensor_parameters(checked, plan),
        allow_nonfinite=recipe.allow_nonfinite,
        clamp_overflow=recipe.clamp_overflow,
    )


def write_weights(
    engine: StreamingEngine, plan: FusionPlan, folders: list[Path], method_name: str, options: FusionOptions
) -> None:
    """Runs the engine into one sharded writer per output folder; a failure leaves no partial shard."""
    writers: list[ShardedSafetensorsWriter] = []
    try:
        for folder in folders:
            folder.mkdir(exist_ok=True)
            writers.append(
                ShardedSafetensorsWriter(
                    folder,
                    plan.output_tensors(),
                    stem=output_stem(plan),
                    max_shard_bytes=options.max_shard_bytes,
                    metadata={"fused_by": f"hf-fusion {__version__}", "fusion_method": method_name},
                )
            )
        engine.run(writers)
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def output_stem(plan: FusionPlan) -> str:
    """Output weights keep the reference's file stem (``diffusion_pytorch_model``...), but dense transformers
    weights are always ``model`` (inputs may be pickles or adapters)."""
    stem = plan.checkpoints[plan.reference].weights_stem.split(".")[0]  # a variant (``.fp16``) is not kept
    return "model" if stem in ("pytorch_model", "adapter_model", "") else stem


def _model_folders(temp: Path, recipe: Recipe, per_model: bool) -> list[Path]:
    """Where weights go: the output folder itself, or one subfolder per input model."""
    return [temp / name for name in output_names(recipe.models)] if per_model else [temp]


def check_memory(headers: list[Checkpoint | None], elementwise: bool, budget_elements: int | None) -> None:
    """Refuses, from headers, a whole-tensor method whose largest tensor times the inputs cannot fit in memory.

    Element-wise methods stream fixed-size slices, so their need does not depend on the models.
    """
    if elementwise:
        needed = 4 * (budget_elements or GPU_BUDGET_ELEMENTS) * 6
    else:
        known = [h for h in headers if h is not None]
        largest = max((e.numel for h in known for e in h.entries.values()), default=0)
        needed = 4 * largest * len(headers) * 4
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    log.debug("estimated working memory: %.2f GB", needed / 1e9)
    if total and needed > total:
        raise InsufficientResourcesError(
            f"this method processes whole tensors: about {needed / 1e9:.1f} GB of working memory for the largest "
            f"one, more than this machine's {total / 1e9:.1f} GB."
        )
