"""The one path every fused model takes: recipe -> validate -> fetch -> fuse -> write -> card -> push.

Everything that can be checked without weights is checked first: method, parameters, model count, output folder,
device, then the push target (token, namespace, existing files), then each input's config and safetensors headers
(read remotely for Hub models: architectures, tensor names and shapes) and the disk space for downloads and output.
Only then are weights downloaded and read.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch

from hf_fusion import __version__
from hf_fusion.architecture import parameter_module_types
from hf_fusion.cards import model_subfolders, write_card
from hf_fusion.engine.checkpoint import Checkpoint
from hf_fusion.engine.dtypes import OUTPUT_DTYPES, TORCH_NAMES
from hf_fusion.engine.plan import FusionPlan, build_plan, check_headers
from hf_fusion.engine.stream import DEFAULT_BUDGET_ELEMENTS, StreamingEngine
from hf_fusion.engine.writer import DEFAULT_MAX_SHARD_BYTES, ShardedSafetensorsWriter
from hf_fusion.errors import FileSystemError, FusionError, InsufficientResourcesError, RecipeError, describe_os_error
from hf_fusion.hub.auth import resolve_token
from hf_fusion.hub.push import PushResult, PushTarget, check_target, push_folder, push_message
from hf_fusion.model_files import check_same_architecture, copy_side_files, same_architecture, set_config_dtype
from hf_fusion.output import AtomicFolder, check_free_space, check_output_folder, clean_leftovers
from hf_fusion.recipe import RECIPE_FILENAME, ModelRef, Recipe, path_exists
from hf_fusion.registry import BaseUse, DataNeed, MethodKind, MethodSpec, get_method
from hf_fusion.report import EvaluationReport
from hf_fusion.tasks.base import EvalSettings
from hf_fusion.sources import Source, check_download_space, fetch, header_checkpoint, open_source, resolve

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
    push: PushResult | None = None
    evaluation: EvaluationReport | None = None
    evaluation_seconds: float = 0.0


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
    uses_base = has_base and spec.base is not BaseUse.UNUSED
    spec.validate_pool(params, len(recipe.models), uses_base)
    if spec.data is not DataNeed.NONE and not recipe.pool:
        raise RecipeError(f"method {spec.name!r} needs {spec.data.value} data from each model's task: pass --pool "
                          "(a catalog pool or a pool file) so the tasks and their datasets are known.")
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
    fields.update({k: v for k, v in overrides.items() if v is not None and k not in ("parameters", "tasks")})
    fields["parameters"] = params
    if fields.get("pool") and not fields.get("models"):
        fields.update(_from_pool(fields["pool"], overrides.get("tasks"), fields))
    return Recipe.build(**fields)


def _from_pool(name: str, tasks: list[str] | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Base, experts and heads of a catalog pool (or pool file), for the selected tasks."""
    from hf_fusion.catalog import get_pool

    pool = get_pool(name)
    specs = pool.select(tasks)
    return {
        "models": [pool.experts[s.name] for s in specs],
        "base": fields.get("base") or pool.base,
        "heads": fields.get("heads") or list(pool.heads),
    }


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
    heads: list[str] | None = None,
    pool: str | None = None,
    tasks: list[str] | None = None,
    evaluate: EvalSettings | bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    push: str | PushTarget | None = None,
    token: str | None = None,
    show_progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    budget_elements: int = DEFAULT_BUDGET_ELEMENTS,
    allow_nonfinite: bool | None = None,
    clamp_overflow: bool | None = None,
    **parameters: Any,
) -> MergeResult:
    """Fuses models into a ``from_pretrained``-ready folder, and optionally pushes it to the Hub.

    ``merge(recipe)`` takes a :class:`Recipe`, a YAML path or a mapping; ``merge(models=[...], base=..., method=...,
    output=..., **params)`` builds one from keywords (keywords also override a given recipe). Models are local
    folders or Hub repo ids (``org/name@revision``). ``push`` is a repo id or a :class:`PushTarget`; without
    ``output`` the fused folder is then built in a temporary folder, removed after a successful push.
    """
    overrides = {
        "models": models, "base": base, "method": method, "output": str(output) if output else None,
        "dtype": dtype, "device": device, "exclude": exclude, "heads": heads, "pool": pool, "tasks": tasks,
        "parameters": parameters, "allow_nonfinite": allow_nonfinite, "clamp_overflow": clamp_overflow,
    }
    checked = validate_recipe(as_recipe(recipe, overrides))
    settings = EvalSettings() if evaluate is True else evaluate or None
    if settings is not None and not checked.recipe.pool:
        raise RecipeError("evaluating needs a pool that says which tasks to score: pass --pool.")
    if isinstance(push, str) and not push.strip():
        raise RecipeError("push needs a repo name (org/name, or name under your account), got an empty one.")
    target_spec = PushTarget(push) if isinstance(push, str) else push
    if not checked.recipe.output and target_spec is None:
        raise RecipeError("no output folder: pass --output (output=...).")
    scratch = None if checked.recipe.output else Path(tempfile.mkdtemp(prefix="hf-fusion-"))
    target = Path(checked.recipe.output).expanduser() if checked.recipe.output else scratch / "fused"  # type: ignore[operator]
    if max_shard_bytes <= 0:
        raise RecipeError(f"the largest shard must be a positive size, got {max_shard_bytes} bytes.")
    try:
        with file_system_errors():
            clean_leftovers(target)
            check_output_folder(target, overwrite=overwrite)
            _check_output_is_not_an_input(target, checked.recipe)
            token = resolve_token(token)
            if target_spec is not None:
                target_spec = check_target(target_spec, token)
            started = time.perf_counter()
            result = _fuse(checked, target, target_spec, token=token, overwrite=overwrite, allow_pickle=allow_pickle,
                           show_progress=show_progress, max_shard_bytes=max_shard_bytes,
                           budget_elements=budget_elements)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    result = replace(result, seconds=time.perf_counter() - started)
    if settings is not None:
        scoring = time.perf_counter()
        report = _evaluate(result, settings, tasks=tasks, token=token, show_progress=show_progress,
                           repo_id=target_spec.repo_id if target_spec else None)
        result = replace(result, evaluation=report, evaluation_seconds=time.perf_counter() - scoring)
    if target_spec is None:
        return result
    pushed = push_folder(target, target_spec, token=token,  # on failure the folder stays
                         default_message=push_message(result.recipe))
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return replace(result, push=pushed)


@contextmanager
def file_system_errors() -> Iterator[None]:
    """Turns an OS error (disk full, permission denied, path too long, a file in the way) into a
    :class:`FileSystemError` that says what to do; the atomic output folder has already been removed."""
    try:
        yield
    except FusionError:
        raise
    except OSError as err:
        if err.errno is None:  # network errors derive from OSError too; they are not the file system's
            raise
        raise FileSystemError(describe_os_error(err)) from err


def _evaluate(result: MergeResult, settings: EvalSettings, *, tasks: list[str] | None, token: str | None,
              show_progress: bool, repo_id: str | None) -> EvaluationReport:
    """Scores the fused folder on its pool's tasks; the report joins the folder and its card."""
    from hf_fusion.catalog import get_pool
    from hf_fusion.evaluation import evaluate_pool

    pool = get_pool(result.recipe.pool)  # type: ignore[arg-type]
    report = evaluate_pool(pool, {"fused": fused_models(result.output, result.recipe, pool)}, tasks=tasks,
                           settings=settings, token=token, show_progress=show_progress)
    report.save(result.output)
    write_card(result.output, repo_id=repo_id)
    return report


def fused_models(folder: Path, recipe: Recipe, pool: Any) -> Path | dict[str, Path]:
    """The fused folder, or for a method that fuses one model per input, each pool task's own subfolder."""
    if not model_subfolders(folder):
        return folder
    by_path = {ref.path: folder / name for ref, name in zip(recipe.models, output_names(recipe.models))}
    return {task: by_path[path] for task, path in pool.expert_paths().items() if path in by_path}


def _fuse(
    checked: ValidatedRecipe,
    target: Path,
    push: PushTarget | None,
    *,
    token: str | None,
    overwrite: bool,
    allow_pickle: bool,
    show_progress: bool,
    max_shard_bytes: int,
    budget_elements: int,
) -> MergeResult:
    """Resolves and checks the inputs, downloads them, and writes the fused folder (with its card) atomically."""
    method_impl = checked.spec.implementation(
        checked.params, num_models=len(checked.recipe.models), has_base=checked.uses_base
    )
    if checked.spec.kind is MethodKind.MODEL_WISE:
        from hf_fusion.modelwise.run import fuse_modules

        return fuse_modules(checked, method_impl, target, push, token=token, overwrite=overwrite,
                            allow_pickle=allow_pickle, show_progress=show_progress, max_shard_bytes=max_shard_bytes)
    inputs, headers = _resolve_and_check(checked, allow_pickle=allow_pickle, token=token)
    check_memory(headers, method_impl.elementwise, budget_elements)
    check_download_space(inputs.sources)
    sources = [fetch(s, token=token, show_progress=show_progress) for s in inputs.sources]
    inputs = replace(inputs, sources=sources)
    recipe = _pin(checked.recipe, inputs)
    checkpoints: list[Checkpoint] = []
    try:
        plan = _plan(checked, inputs, checkpoints, allow_pickle=allow_pickle)
        copies = len(checked.recipe.models) if method_impl.outputs_per_model else 1
        check_free_space(target, plan.output_bytes * copies)
        module_types = None
        if method_impl.needs_module_types:
            module_types = parameter_module_types(sources[plan.experts[0]].folder, [t.key for t in plan.fused])  # type: ignore[arg-type]
        engine = StreamingEngine(
            plan, method_impl, uses_base=checked.uses_base, device=recipe.device,
            budget_elements=budget_elements, show_progress=show_progress, module_types=module_types,
            allow_nonfinite=recipe.allow_nonfinite, clamp_overflow=recipe.clamp_overflow,
        )
        atomic = AtomicFolder(target, overwrite=overwrite)
        with atomic as temp:
            folders = _model_folders(temp, recipe, method_impl.outputs_per_model)
            writers: list[ShardedSafetensorsWriter] = []
            try:
                for folder in folders:
                    folder.mkdir(exist_ok=True)
                    writers.append(ShardedSafetensorsWriter(
                        folder, plan.output_tensors(), stem=_output_stem(plan), max_shard_bytes=max_shard_bytes,
                        metadata={"fused_by": f"hf-fusion {__version__}", "fusion_method": checked.spec.name},
                    ))
                engine.run(writers)
                for writer in writers:
                    writer.close()
            except BaseException:
                for writer in writers:
                    writer.abort()
                raise
            for folder in folders:
                _write_model_files(recipe, plan, [s.folder for s in sources], folder)  # type: ignore[misc]
            _write_recipe(recipe, temp)
            repo_id = push.repo_id if push else None
            write_card(temp, repo_id=repo_id, load_path=repo_id or str(target))
            files = sorted(os.listdir(temp))
            atomic.commit()
    finally:
        for ckpt in checkpoints:
            ckpt.close()
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


@dataclass(frozen=True)
class Inputs:
    """The resolved inputs: ``sources`` is [base] + models when a base is present, else the models.

    A base is present when the method reads it, or when LoRA adapters need it to become dense models.
    """

    sources: list[Source]
    has_base: bool
    base_is_input: bool

    @property
    def experts(self) -> list[int]:
        return list(range(1 if self.has_base else 0, len(self.sources)))


def _resolve_and_check(checked: ValidatedRecipe, *, allow_pickle: bool, token: str | None
                       ) -> tuple[Inputs, list[Checkpoint | None]]:
    """Resolves every input (metadata only) and checks architectures, names and shapes from headers."""
    recipe = checked.recipe
    experts = [resolve(ref, token=token, allow_pickle=allow_pickle) for ref in recipe.models]
    adapters = [s for s in experts if s.adapter_config is not None]
    base_ref = recipe.base if (checked.uses_base or adapters) else None
    if recipe.base is not None and base_ref is None:
        log.warning("method %s does not use a base model; %s is ignored", recipe.method, recipe.base)
    if base_ref is None and adapters:
        named = {str(b): b for b in (s.adapter_base() for s in adapters) if b is not None}
        if not named:
            raise RecipeError(f"{adapters[0].label} is a LoRA adapter that names no base model: pass --base.")
        if len(named) > 1:
            raise RecipeError(f"the LoRA adapters name different base models ({', '.join(sorted(named))}): "
                              "pass --base.")
        base_ref = next(iter(named.values()))
    base = [resolve(base_ref, token=token, allow_pickle=allow_pickle)] if base_ref else []
    inputs = Inputs(base + experts, bool(base), checked.uses_base)
    check_same_architecture([s.label for s in experts], [s.config for s in experts])
    headers = [header_checkpoint(s, allow_pickle=allow_pickle) for s in inputs.sources]
    if all(h is not None for h in headers):
        check_headers(headers, base=0 if inputs.base_is_input else None, experts=inputs.experts,  # type: ignore[arg-type]
                      uses_base=inputs.base_is_input, exclude=recipe.exclude, heads=recipe.heads)
    return inputs, headers


def _pin(recipe: Recipe, inputs: Inputs) -> Recipe:
    """The recipe with every Hub input pinned to the commit it was fetched at (a LoRA-only base recorded too)."""
    refs = [s.ref for s in inputs.sources]
    base = refs.pop(0) if inputs.has_base else recipe.base
    return recipe.replace(models=refs, base=base)


def _check_output_is_not_an_input(target: Path, recipe: Recipe) -> None:
    """Refuses an output folder that is, or contains, one of the models being read."""
    out = target.resolve()
    for ref in [*recipe.models, *([recipe.base] if recipe.base else [])]:
        path = Path(ref.path).expanduser()
        if path_exists(path):
            model = path.resolve()
            if model == out or out in model.parents:
                raise RecipeError(f"the output folder {target} would replace the input model {ref}; choose another.")


def _plan(checked: ValidatedRecipe, inputs: Inputs, checkpoints: list[Checkpoint], *, allow_pickle: bool
          ) -> FusionPlan:
    """Opens the fetched checkpoints (adapters as dense models) and builds the full plan, tied tensors included."""
    sources = inputs.sources
    base = open_source(sources[0], allow_pickle=allow_pickle, lora_base=None) if inputs.has_base else None
    checkpoints += [base] if base is not None else []
    checkpoints += [open_source(sources[i], allow_pickle=allow_pickle, lora_base=base) for i in inputs.experts]
    first = inputs.experts[0]
    reference = first
    if inputs.base_is_input and (
        checked.recipe.heads
        or same_architecture(sources[0].config, sources[first].config)
        or (sources[first].adapter_config is not None and sources[first].config is None)
    ):
        reference = 0
    return build_plan(
        checkpoints, base=0 if inputs.base_is_input else None, experts=inputs.experts,
        uses_base=inputs.base_is_input, reference=reference, exclude=checked.recipe.exclude,
        heads=checked.recipe.heads, out_dtype=OUTPUT_DTYPES[checked.recipe.dtype],
    )


def _output_stem(plan: FusionPlan) -> str:
    """Output weights keep the reference's file stem (``diffusion_pytorch_model``...), but dense transformers
    weights are always ``model`` (inputs may be pickles or adapters)."""
    stem = plan.checkpoints[plan.reference].weights_stem
    return "model" if stem in ("pytorch_model", "adapter_model", "") else stem


def output_names(models: list[ModelRef]) -> list[str]:
    """Subfolder names for methods that fuse one model per input: the last part of each model's path or repo id,
    made unique (``svhn``, ``svhn-2``)."""
    names: list[str] = []
    for ref in models:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", ref.path.rstrip("/").split("/")[-1].split(":")[-1]).strip(".-")
        name, n = stem or "model", 1
        while name in names:
            n += 1
            name = f"{stem or 'model'}-{n}"
        names.append(name)
    return names


def _model_folders(temp: Path, recipe: Recipe, per_model: bool) -> list[Path]:
    """Where weights go: the output folder itself, or one subfolder per input model."""
    return [temp / name for name in output_names(recipe.models)] if per_model else [temp]


def _write_model_files(recipe: Recipe, plan: FusionPlan, folders: list[Path], dest: Path) -> None:
    """Config, tokenizer and other side files next to a fused model's weights."""
    reference = folders[plan.reference]
    others = [folders[i] for i in ([plan.base] if plan.base is not None else []) + plan.experts]
    copy_side_files(reference, [f for f in others if f != reference], dest)
    code = OUTPUT_DTYPES[recipe.dtype]
    if code is not None:
        set_config_dtype(dest, TORCH_NAMES[code])


def _write_recipe(recipe: Recipe, dest: Path) -> None:
    (dest / RECIPE_FILENAME).write_text(
        f"# Fused with hf-fusion {__version__}. Reproduce: hf-fusion merge --config {RECIPE_FILENAME} --output DIR\n"
        + recipe.replace(output=None).to_yaml()  # where it was written is not part of what was fused
    )


def check_memory(headers: list[Checkpoint | None], elementwise: bool, budget_elements: int) -> None:
    """Refuses, from headers, a whole-tensor method whose largest tensor times the inputs cannot fit in memory.

    Element-wise methods stream fixed-size slices, so their need does not depend on the models.
    """
    if elementwise:
        needed = 4 * budget_elements * 6
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
