"""Diffusers pipelines: each weight component fused by the streaming engine, the other parts copied, one folder.

A pipeline input is a folder or Hub repo with ``model_index.json``. Its weight components (UNet or transformer,
text encoders, VAE) are each a model of their own; every fused component gets its own plan and runs through the
same engine, methods and per-tensor parameters as a transformers model (per-tensor filters and gradients see
``component.tensor`` names, so ``down_blocks`` or ``text_encoder.`` pick blocks and components). Scheduler,
tokenizers and components left out of ``components`` are copied from the reference pipeline: the base when the
recipe names one, else the first model. LoRAs for the base pipeline (diffusers/peft or kohya files) are read as
the dense components they make with the base, through diffusers' own format converters.

Everything is checked from metadata before any weight moves: the pipeline classes, that every input has each fused
component with the same class, and the components' tensor names and shapes (remote headers for Hub pipelines).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import hf_hub_download

from hf_fusion.catalog import BUILTIN_PREFIX
from hf_fusion.engine.blocks import component_positions
from hf_fusion.engine.checkpoint import Checkpoint, open_checkpoint
from hf_fusion.engine.dtypes import TORCH_NAMES
from hf_fusion.engine.plan import FusionPlan, build_plan, check_headers
from hf_fusion.engine.stream import StreamingEngine
from hf_fusion.errors import CheckpointError, IncompatibleModelsError, RecipeError
from hf_fusion.fusion.options import FusionOptions
from hf_fusion.fusion.output_folder import seal
from hf_fusion.fusion.result import MergeResult
from hf_fusion.fusion.single_file import (
    SingleFileInput,
    check_fits_base,
    check_fits_unet,
    converted_folder,
    hub_header_shapes,
    hub_single_file,
    local_single_file,
)
from hf_fusion.fusion.tensor_wise import check_memory, write_weights
from hf_fusion.fusion.validate import ValidatedRecipe
from hf_fusion.hub.errors import hub_errors
from hf_fusion.hub.resolve import (
    HubListing,
    cached_model,
    download,
    download_file,
    list_hub_repo,
    resolve_hub_model,
)
from hf_fusion.model_files import local_folder, read_config, set_config_dtype
from hf_fusion.output import AtomicFolder, check_free_space
from hf_fusion.pipeline_files import (
    MODEL_INDEX,
    PipelineIndex,
    copy_component,
    is_component_side_file,
    local_files,
    parse_model_index,
    read_model_index,
    weight_components,
    write_model_index,
)
from hf_fusion.recipe import OUTPUT_DTYPES, ModelRef
from hf_fusion.sources import Source, check_cache_space, check_download_space, is_offline

if TYPE_CHECKING:
    from hf_fusion.engine.diffusion_lora import LoraFactors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineInput:
    """One input pipeline: its index and weight components as sources (``folder`` set once it is local)."""

    ref: ModelRef
    label: str
    index: PipelineIndex
    components: dict[str, Source]
    folder: Path | None = None
    listing: HubListing | None = None
    metadata_folder: Path | None = None
    """Where ``model_index.json`` and the component configs are on disk (the whole pipeline once fetched)."""


@dataclass(frozen=True)
class LoraInput:
    """A LoRA for the base pipeline: its file (local once fetched) and its factors by component and tensor."""

    ref: ModelRef
    label: str
    file: Path
    factors: dict[str, dict[str, LoraFactors]] = field(default_factory=dict)


PipelineMember = PipelineInput | LoraInput | SingleFileInput


@dataclass(frozen=True)
class PipelineInputs:
    """The resolved inputs of a pipeline fusion: ``base`` (when there is one) and the models, in recipe order."""

    base: PipelineInput | None
    models: list[PipelineMember]
    components: list[str]
    """The components fused, in the reference's index order."""

    @property
    def reference(self) -> PipelineInput:
        if self.base is not None:
            return self.base
        first = self.models[0]
        assert isinstance(first, PipelineInput)
        return first


def is_pipeline_fusion(checked: ValidatedRecipe, *, token: str | None) -> bool:
    """Whether the recipe fuses diffusers pipelines: its first model is one, or its base is (the models are then
    LoRAs or single-file checkpoints for it). The first model is looked at first, so a missing one is named."""
    recipe = checked.recipe
    if is_pipeline(recipe.models[0], token=token):
        return True
    return recipe.base is not None and is_pipeline(recipe.base, token=token)


def is_pipeline(ref: ModelRef, *, token: str | None) -> bool:
    """Whether ``ref`` is a diffusers pipeline (``model_index.json``), from a local stat or the repo's listing."""
    if ref.path.startswith(BUILTIN_PREFIX):
        return False
    if ref.is_local:
        return (local_folder(ref) / MODEL_INDEX).is_file()
    if is_offline():
        return _cached_pipeline_folder(ref) is not None
    return MODEL_INDEX in list_hub_repo(ref, token=token).sizes


def resolve_pipeline(
    ref: ModelRef,
    *,
    token: str | None,
    allow_pickle: bool,
    only: list[str] | None = None,
    variant: str | None = None,
) -> PipelineInput | None:
    """Metadata only: the pipeline's index, and each weight component's config and tensor headers (of the ``only``
    components when given: an input whose other parts are never read is not refused for them); None when ``ref``
    is not a pipeline."""
    label = str(ref)
    if ref.is_local or is_offline():
        folder = local_folder(ref) if ref.is_local else _cached_pipeline_folder(ref)
        if folder is None:
            return None
        index = read_model_index(folder, label)
        if index is None:
            return None
        pinned = ref if ref.is_local else ref.model_copy(update={"commit": folder.name})
        names = [c for c in weight_components(index, local_files(folder)) if only is None or c in only]
        sources = {c: Source(pinned, f"{label}:{c}", read_config(folder / c), folder / c) for c in names}
        return PipelineInput(pinned, label, index, sources, folder=folder, metadata_folder=folder)
    listing = list_hub_repo(ref, token=token)
    if MODEL_INDEX not in listing.sizes:
        return None
    with hub_errors(ref.path, listing.ref.commit, "read"):
        index_file = Path(hf_hub_download(ref.path, MODEL_INDEX, revision=listing.ref.commit, token=token))
    index = parse_model_index(index_file.read_text(), label)
    sources = {}
    for name in [c for c in weight_components(index, listing.sizes) if only is None or c in only]:
        hub = resolve_hub_model(
            ref, token=token, allow_pickle=allow_pickle, listing=listing, subfolder=name, variant=variant
        )
        sources[name] = Source(listing.ref, f"{label}:{name}", hub.config, hub=hub)
    # the component configs were fetched beside the index, into the same cached snapshot
    return PipelineInput(listing.ref, label, index, sources, listing=listing, metadata_folder=index_file.parent)


def _cached_pipeline_folder(ref: ModelRef) -> Path | None:
    """Offline: the cached snapshot of a pipeline repo, found by its ``model_index.json``."""
    try:
        _, folder = cached_model(ref, MODEL_INDEX)
    except Exception:  # noqa: BLE001 - not in the cache: the regular resolver reports it in its own words
        return None
    return folder if (folder / MODEL_INDEX).is_file() else None


_NEITHER = (
    "{label} is neither a diffusers pipeline (no model_index.json), a LoRA for the base, nor a single-file "
    "checkpoint{detail}: every input of a pipeline fusion is one of these."
)


def resolve_member(ref: ModelRef, base: PipelineInput | None, *, token: str | None) -> LoraInput | SingleFileInput:
    """A model of a pipeline fusion that is not a pipeline: a LoRA for the base (its file fetched, LoRAs are small,
    and converted by diffusers' converter for the base's class) or a single-file checkpoint (typed from its header,
    converted after every check)."""
    from hf_fusion.engine.diffusion_lora import find_lora_file, holds_lora_keys

    label = str(ref)
    if base is None:
        raise RecipeError(
            f"{label} is not a diffusers pipeline: LoRAs and single-file checkpoints need the pipeline they belong "
            "to as --base (its configs and, for a LoRA, its weights)."
        )
    if ref.is_local or is_offline():
        if ref.is_local:
            path = local_folder(ref)
        else:  # offline: the cached snapshot's one safetensors file, pinned to its commit
            ref, folder = cached_model(ref, "*.safetensors")
            files = sorted(folder.glob("*.safetensors"))
            path = files[0] if len(files) == 1 else folder
        lora = find_lora_file(path)
        if lora is not None:
            return _lora_input(ref, label, lora, base)
        single = local_single_file(ref, path)
        if single is None:
            raise RecipeError(_NEITHER.format(label=label, detail=""))
    else:
        listing = list_hub_repo(ref, token=token)
        files = [n for n in listing.sizes if n.endswith(".safetensors") and "/" not in n]
        if len(files) != 1:
            detail = f" (it has {len(files)} top-level safetensors files, not one)"
            raise RecipeError(_NEITHER.format(label=label, detail=detail))
        shapes = hub_header_shapes(ref, listing, files[0], token=token)
        if not holds_lora_keys(shapes):
            single = hub_single_file(ref, listing, files[0], shapes)
        else:  # a LoRA: small, fetched now to read its factors
            check_cache_space(listing.sizes.get(files[0], 0), label)
            file = download_file(listing, files[0], token=token)
            lora = find_lora_file(file)
            if lora is None:
                raise RecipeError(_NEITHER.format(label=label, detail=""))
            return _lora_input(listing.ref, label, lora, base)
    check_fits_base(single, base.index.class_name, base.label)
    unet = base.components.get("unet")
    check_fits_unet(single, unet.config if unet is not None else None, base.label)
    return single


def _lora_input(ref: ModelRef, label: str, file: Path, base: PipelineInput) -> LoraInput:
    from hf_fusion.engine.diffusion_lora import read_pipeline_lora

    factors = read_pipeline_lora(file, base.index.class_name, label, base_folder=base.metadata_folder)
    unknown = sorted(set(factors) - set(base.components))
    if unknown:
        raise CheckpointError(
            f"{label}: the LoRA adapts {unknown[0]!r}, which the base pipeline {base.label} does not have: "
            "is it a LoRA for another base?"
        )
    return LoraInput(ref, label, file, factors)


def resolve_pipelines(checked: ValidatedRecipe, options: FusionOptions) -> PipelineInputs:
    """Resolves every input (metadata only) and checks them as pipelines: one class, each fused component in
    every pipeline with the same class, LoRAs and single-file checkpoints that fit the base."""
    recipe = checked.recipe
    _refuse_unsupported(checked)
    token, pickle = options.token, options.allow_pickle
    base = None
    if recipe.base is not None:
        base = resolve_pipeline(recipe.base, token=token, allow_pickle=pickle, variant=recipe.variant)
        if base is None:
            raise RecipeError(f"the base {recipe.base} is not a diffusers pipeline (no {MODEL_INDEX}).")
    models: list[PipelineMember] = []
    components: list[str] | None = None
    for ref in recipe.models:
        reference = base or next((m for m in models if isinstance(m, PipelineInput)), None)
        if reference is not None and components is None:
            components = default_components(reference, recipe.components)
        found = resolve_pipeline(ref, token=token, allow_pickle=pickle, only=components, variant=recipe.variant)
        member = found if found is not None else resolve_member(ref, base, token=token)
        if isinstance(member, SingleFileInput) and not options.convert_single_files:
            raise RecipeError(
                f"{member.label} is a single-file checkpoint, which this server does not convert (conversion holds "
                "the whole model in memory): give the diffusers pipeline repo instead."
            )
        models.append(member)
    reference = base or next(m for m in models if isinstance(m, PipelineInput))
    components = components or default_components(reference, recipe.components)
    loras = [m for m in models if isinstance(m, LoraInput)]
    touched = {c for m in loras for c in m.factors}
    if loras and len(loras) == len(models) and not recipe.components:
        components = [c for c in components if c in touched]  # what no LoRA changes stays the base's
    elif loras and not touched & set(components):
        log.warning("the LoRAs change %s, none of which is fused: the output is the base's", ", ".join(sorted(touched)))
    inputs = PipelineInputs(base, models, components)
    check_structure(inputs)
    return inputs


NOT_FUSED_BY_DEFAULT = ("safety_checker", "image_encoder", "feature_extractor")
"""Weight components that are not the generator: taken from the reference unless ``components`` names them."""


def default_components(reference: PipelineInput, chosen: list[str] | None) -> list[str]:
    """The components to fuse: the recipe's (in the order it gives, without repeats), else the reference's weight
    components that generate (UNet or transformer, text encoders, VAE)."""
    if chosen:
        return list(dict.fromkeys(chosen))
    return [c for c in reference.components if c not in NOT_FUSED_BY_DEFAULT]


def check_structure(inputs: PipelineInputs) -> None:
    """One pipeline class, and every fused component in every pipeline with the reference's class."""
    reference = inputs.reference
    pipelines = [p for p in [inputs.base, *inputs.models] if isinstance(p, PipelineInput)]
    for other in pipelines:
        if other.index.class_name != reference.index.class_name:
            raise IncompatibleModelsError(
                f"{other.label} is a {other.index.class_name} but {reference.label} is a "
                f"{reference.index.class_name}: pipelines of different classes cannot be fused."
            )
    available = list(reference.components)
    for name in inputs.components:
        if name not in available:
            raise RecipeError(
                f"{reference.label} has no weight component {name!r}; its components are {', '.join(available)}."
            )
    present = _component_folders(reference)
    for name in reference.index.components:
        if name not in present:
            raise CheckpointError(
                f"{reference.label}: {MODEL_INDEX} names {name!r}, but it has no {name}/ folder to take it from."
            )
        source = reference.components.get(name)
        if name not in inputs.components and source is not None and source.hub is not None:
            if source.hub.weight_kind != "safetensors":
                raise CheckpointError(
                    f"{reference.label}: {name}/ holds pickle weights only, which an output does not carry; fuse it "
                    "too (--components) with --allow-pickle, or use a safetensors revision."
                )
    for pipeline in pipelines:
        for name in inputs.components:
            if name not in pipeline.components:
                raise IncompatibleModelsError(
                    f"{pipeline.label} has no {name!r} component, which {reference.label} has."
                )
            theirs, ours = pipeline.index.components.get(name), reference.index.components[name]
            if theirs != ours:
                raise IncompatibleModelsError(
                    f"{pipeline.label}'s {name!r} is a {theirs[1] if theirs else None} but {reference.label}'s is a "
                    f"{ours[1]}."
                )


def _component_folders(pipeline: PipelineInput) -> set[str]:
    """The subfolders a pipeline has, from its folder or its Hub listing."""
    if pipeline.folder is not None:
        return {p.name for p in pipeline.folder.iterdir() if p.is_dir()}
    assert pipeline.listing is not None
    return {n.split("/", 1)[0] for n in pipeline.listing.sizes if "/" in n}


def _refuse_unsupported(checked: ValidatedRecipe) -> None:
    recipe = checked.recipe
    unsupported = [
        ("slices", bool(recipe.slices)),
        ("tokenizer", recipe.tokenizer is not None),
        ("chat_template", recipe.chat_template is not None),
        ("heads", bool(recipe.heads)),
    ]
    for name, present in unsupported:
        if present:
            raise RecipeError(f"{name} applies to transformers models; diffusers pipelines do not take it.")


def component_inputs(inputs: PipelineInputs, name: str) -> tuple[list[Source], list[int]]:
    """The sources the fusion of one component reads, ``[base] + models`` (a LoRA is represented by the base's
    component, which it is applied to), and the positions of the LoRAs among them."""
    base = [inputs.base.components[name]] if inputs.base is not None else []
    sources = list(base)
    loras = []
    for member in inputs.models:
        if isinstance(member, LoraInput):
            loras.append(len(sources))
            sources.append(inputs.base.components[name])  # type: ignore[union-attr]
        else:
            sources.append(member.components[name])
    return sources, loras


def component_checkpoints(
    inputs: PipelineInputs, name: str, opened: list[Checkpoint], loras: list[int]
) -> list[Checkpoint]:
    """``opened`` (base first) with each LoRA position replaced by the base component with the LoRA applied."""
    if not loras:
        return list(opened)
    from hf_fusion.engine.diffusion_lora import LoraDeltaCheckpoint

    lora_members = [m for m in inputs.models if isinstance(m, LoraInput)]
    out = list(opened)
    for position, member in zip(loras, lora_members):
        factors = member.factors.get(name, {})
        out[position] = LoraDeltaCheckpoint(f"{member.label}:{name}", opened[0], factors)
    return out


def check_components(
    checked: ValidatedRecipe, inputs: PipelineInputs, options: FusionOptions, elementwise: bool
) -> None:
    """From headers, before any download: each component's tensor names and shapes agree, LoRAs fit the base, the
    method fits in memory, and per-tensor parameters resolve (filters that match no tensor of any component are
    reported once)."""
    schedule = checked.schedule
    names: dict[str, float] = {}
    has_base = inputs.base is not None
    # single-file checkpoints are checked once converted, when their tensors have diffusers names
    inputs = replace(inputs, models=[m for m in inputs.models if not isinstance(m, SingleFileInput)])
    if not inputs.models:
        return
    for name in inputs.components:
        sources, loras = component_inputs(inputs, name)
        headers = [_open_component(s, options, checked.recipe.variant) for s in sources]
        if any(h is None for h in headers):
            continue
        headers = component_checkpoints(inputs, name, headers, loras)  # type: ignore[arg-type]
        read, roles = _read_roles(headers, has_base=has_base, uses_base=checked.uses_base)  # type: ignore[arg-type]
        check_headers(
            read, **roles, exclude=component_excludes(checked.recipe.exclude, name, inputs.reference.index), heads=[]
        )
        check_memory(headers, elementwise, options.budget_elements)  # type: ignore[arg-type]
        positions = component_positions(list(headers[-1].entries))  # type: ignore[union-attr]
        names.update({f"{name}.{tensor}": at for tensor, at in positions.items()})
    if schedule.varies:
        schedule.resolve_all(names)


def fetch_pipelines(inputs: PipelineInputs, options: FusionOptions) -> PipelineInputs:
    """Downloads what each Hub pipeline contributes: every fused component, and for the reference also the parts
    the output copies (model index, scheduler, tokenizers, components not fused)."""
    reference = inputs.reference
    pipelines = [p for p in [inputs.base, *inputs.models] if isinstance(p, PipelineInput)]
    check_download_space(
        [s for p in pipelines for name, s in p.components.items() if name in inputs.components or p is reference]
    )

    def fetched(pipeline: PipelineInput) -> PipelineInput:
        if pipeline.folder is not None:
            return pipeline
        assert pipeline.listing is not None
        wanted = inputs.components if pipeline is not reference else list(pipeline.index.components)
        files = [MODEL_INDEX] + (["README.md"] if "README.md" in pipeline.listing.sizes else [])  # its license
        for name in wanted:
            source = pipeline.components.get(name)
            if source is not None and source.hub is not None:
                files += source.hub.download_files
            else:  # a part without weights: the files the output copies from it
                files += [n for n in pipeline.listing.sizes if is_component_side_file(n, name)]
        first = next(iter(pipeline.components.values()))
        assert first.hub is not None
        root = download(first.hub, token=options.token, show_progress=options.show_progress, extra_files=tuple(files))
        components = {c: replace(s, folder=root / c) for c, s in pipeline.components.items()}
        return replace(pipeline, components=components, folder=root)

    base = fetched(inputs.base) if inputs.base is not None else None
    models = [fetched(m) if isinstance(m, PipelineInput) else m for m in inputs.models]
    done = PipelineInputs(base, models, inputs.components)
    config = done.reference
    assert config.folder is not None
    converted = [_converted(m, config, options) if isinstance(m, SingleFileInput) else m for m in done.models]
    return PipelineInputs(base, converted, inputs.components)


def _converted(item: SingleFileInput, config: PipelineInput, options: FusionOptions) -> PipelineInput:
    """A single-file checkpoint as the pipeline it converts to (configured from the reference pipeline), keeping
    its own name and reference."""
    folder = converted_folder(item, config.index.class_name, config.folder, token=options.token)  # type: ignore[arg-type]
    pipeline = resolve_pipeline(ModelRef(path=str(folder)), token=options.token, allow_pickle=False)
    assert pipeline is not None
    components = {c: replace(s, label=f"{item.label}:{c}") for c, s in pipeline.components.items()}
    return replace(pipeline, ref=item.ref, label=item.label, components=components)


def fuse_pipeline(
    checked: ValidatedRecipe, target: Path, options: FusionOptions, *, repo_id: str | None
) -> MergeResult:
    """Resolves and checks the pipelines, downloads them, fuses each chosen component and writes the pipeline
    folder (model index, copied parts, card) atomically."""
    method = checked.spec.implementation(
        checked.params, num_models=len(checked.recipe.models), has_base=checked.uses_base
    )
    if method.outputs_per_model:
        raise RecipeError(f"{checked.spec.name} writes one model per input; pipelines take methods with one output.")
    if method.needs_module_types:
        raise RecipeError(
            f"{checked.spec.name} with only_on_linear_weights reads transformers module types, which pipeline "
            "components do not have: leave it off."
        )
    inputs = resolve_pipelines(checked, options)
    check_components(checked, inputs, options, method.elementwise)
    checked_models = inputs.models
    inputs = fetch_pipelines(inputs, options)
    if any(isinstance(m, SingleFileInput) for m in checked_models):
        check_structure(inputs)
        check_components(checked, inputs, options, method.elementwise)
    recipe = checked.recipe.replace(
        models=[m.ref for m in inputs.models], base=inputs.base.ref if inputs.base is not None else None
    )
    reference = inputs.reference
    assert reference.folder is not None
    fused = copied = passes = output_bytes = 0
    atomic = AtomicFolder(target, overwrite=options.overwrite)
    with atomic as temp:
        write_model_index(reference.folder, temp)
        for name in inputs.components:
            plan, stats = _fuse_component(checked, inputs, name, temp / name, options, method)
            fused += len(plan.fused)
            copied += len(plan.tensors) - len(plan.fused)
            passes += stats
            output_bytes += plan.output_bytes
        with_weights = set(weight_components(reference.index, local_files(reference.folder)))
        for name in reference.index.components:
            if name not in inputs.components:
                copy_component(
                    reference.folder / name,
                    temp / name,
                    weights=name in with_weights,
                    label=reference.label,
                    variant=recipe.variant,
                )
        notes = method.notes()
        files = seal(atomic, temp, recipe, target=target, repo_id=repo_id, notes=notes)
    return MergeResult(
        output=target,
        recipe=recipe,
        files=files,
        seconds=0.0,
        fused_tensors=fused,
        copied_tensors=copied,
        statistics_passes=passes,
        output_bytes=output_bytes,
    )


def _fuse_component(
    checked: ValidatedRecipe,
    inputs: PipelineInputs,
    name: str,
    dest: Path,
    options: FusionOptions,
    method: Any,
) -> tuple[FusionPlan, int]:
    """One component through the engine into ``dest``, with the reference's config beside its weights."""
    sources, loras = component_inputs(inputs, name)
    opened: list[Checkpoint] = []
    try:
        for source in sources:
            assert source.folder is not None
            opened.append(_open_component(source, options, checked.recipe.variant))  # type: ignore[arg-type]
        views = component_checkpoints(inputs, name, opened, loras)
        views, roles = _read_roles(views, has_base=inputs.base is not None, uses_base=checked.uses_base)
        plan = build_plan(
            views,
            **roles,
            reference=0,
            exclude=component_excludes(checked.recipe.exclude, name, inputs.reference.index),
            heads=[],
            out_dtype=OUTPUT_DTYPES[checked.recipe.dtype],
        )
        check_free_space(dest.parent, plan.output_bytes)
        engine = StreamingEngine(
            plan,
            method,
            uses_base=checked.uses_base,
            device=checked.recipe.device,
            budget_elements=options.budget_elements,
            show_progress=options.show_progress,
            parameters=_component_parameters(checked, name, plan),
            allow_nonfinite=checked.recipe.allow_nonfinite,
            clamp_overflow=checked.recipe.clamp_overflow,
        )
        write_weights(engine, plan, [dest], checked.spec.name, options)
        reference = inputs.reference
        copy_component(reference.components[name].folder, dest, weights=False, label=reference.label)  # type: ignore[arg-type]
        code = OUTPUT_DTYPES[checked.recipe.dtype]
        if code is not None and inputs.reference.index.components[name][0] == "transformers":
            set_config_dtype(dest, TORCH_NAMES[code])
        return plan, engine.passes
    finally:
        for checkpoint in opened:
            checkpoint.close()


def _component_parameters(checked: ValidatedRecipe, name: str, plan: FusionPlan) -> dict[str, Any]:
    """Each fused tensor's parameters when the recipe varies them, resolved on ``component.tensor`` names, with
    gradients over the component's blocks (UNet, Flux) or layers (text encoders)."""
    if not checked.schedule.varies:
        return {}
    positions = component_positions([t.name for t in plan.tensors])  # excluded tensors still count as blocks
    return {t.key: checked.schedule.resolve(f"{name}.{t.name}", positions[t.name]) for t in plan.fused}


def component_excludes(patterns: list[str], component: str, index: PipelineIndex) -> list[str]:
    """``exclude`` patterns for one component: a pattern that starts with a component's name (``vae.*``,
    ``unet.conv_in*``) applies to that component only, as per-tensor filters do; others apply to every one."""
    out = []
    for pattern in patterns:
        owner = next((c for c in index.components if pattern.startswith(f"{c}.")), None)
        if owner is None:
            out.append(pattern)
        elif owner == component:
            out.append(pattern[len(component) + 1 :])
    return out


def _open_component(source: Source, options: FusionOptions, variant: str | None) -> Checkpoint | None:
    """A component opened from its folder (the variant's files where it has them), or, before it is fetched, its
    Hub headers."""
    if source.folder is not None:
        return open_checkpoint(source.folder, source.label, allow_pickle=options.allow_pickle, variant=variant)
    assert source.hub is not None
    return source.hub.headers


def _read_roles(views: list[Checkpoint], *, has_base: bool, uses_base: bool) -> tuple[list[Checkpoint], dict[str, Any]]:
    """The checkpoints a component's fusion reads (the base left out when the method does not use it, as it is
    there only for LoRAs) and their roles, as ``check_headers`` and ``build_plan`` take them."""
    read = views[1:] if has_base and not uses_base else views
    roles = {
        "base": 0 if uses_base else None,
        "experts": list(range(1 if uses_base else 0, len(read))),
        "uses_base": uses_base,
    }
    return read, roles
