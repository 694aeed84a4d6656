"""The one path every fused model takes: recipe -> validation -> inputs -> fusion -> output folder -> card -> push.

Everything that can be checked without weights is checked first: method, parameters, model count, output folder,
device, then the push target (token, namespace, existing files), then each input's config and safetensors headers
(read remotely for Hub models: architectures, tensor names and shapes) and the disk space for downloads and output.
Only then are weights downloaded and read.

Under ``accelerate launch`` or ``torchrun`` every process runs :func:`merge`: every check runs on every process (so
a refused request fails everywhere), and whatever writes (leftovers cleaned, the output folder, its card, the push)
runs on the main process only, whose result every process returns. Tensor-wise methods fuse on the main process
while the others wait; model-wise methods run on every process, which share their data (see
:mod:`hf_fusion.fusion.model_wise`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from hf_fusion.engine.writer import DEFAULT_MAX_SHARD_BYTES
from hf_fusion.errors import FileSystemError, FusionError, RecipeError, describe_os_error
from hf_fusion.fusion.adapter_output import fuse_to_adapter
from hf_fusion.fusion.evaluate import evaluate_fused
from hf_fusion.fusion.inputs import check_output_is_not_an_input
from hf_fusion.fusion.model_wise import fuse_model_wise
from hf_fusion.fusion.options import FusionOptions
from hf_fusion.fusion.pipelines import fuse_pipeline, is_pipeline_fusion
from hf_fusion.fusion.result import MergeResult
from hf_fusion.fusion.tensor_wise import fuse_tensor_wise
from hf_fusion.fusion.validate import ValidatedRecipe, as_recipe, validate_recipe
from hf_fusion.hub.auth import resolve_token
from hf_fusion.hub.push import PushTarget, check_target, push_folder, push_message
from hf_fusion.output import check_output_folder, clean_leftovers
from hf_fusion.recipe import Recipe
from hf_fusion.registry import MethodKind
from hf_fusion.runtime import Runtime, check_mixed_precision, current
from hf_fusion.tasks.base import EvalSettings


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
    tokenizer: str | None = None,
    chat_template: str | None = None,
    components: list[str] | None = None,
    variant: str | None = None,
    output_format: str | None = None,
    rank: int | None = None,
    evaluate: EvalSettings | bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    push: str | PushTarget | None = None,
    token: str | None = None,
    show_progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    budget_elements: int | None = None,
    allow_nonfinite: bool | None = None,
    clamp_overflow: bool | None = None,
    mixed_precision: str = "no",
    convert_single_files: bool = True,
    runtime: Runtime | None = None,
    **parameters: Any,
) -> MergeResult:
    """Fuses models into a ``from_pretrained``-ready folder, and optionally pushes it to the Hub.

    ``merge(recipe)`` takes a :class:`Recipe`, a YAML path or a mapping; ``merge(models=[...], base=..., method=...,
    output=..., **params)`` builds one from keywords (keywords also override a given recipe). ``tokenizer`` (``base``,
    ``union`` or a model) and ``chat_template`` (``auto``, a model or a Jinja template) fuse models whose
    vocabularies differ and choose the output's chat template. ``components`` limits which components of diffusers pipelines are fused
    (the others come from the base); ``variant`` (``fp16``) reads their weights of that variant. ``output_format="adapter"`` fuses a pool of LoRA adapters
    into one peft LoRA adapter (of ``rank``, where the method is not linear) instead of a dense model. Models are local
    folders or Hub repo ids (``org/name@revision``). ``push`` is a repo id or a :class:`PushTarget`; without
    ``output`` the fused folder is then built in a temporary folder, removed after a successful push.
    ``mixed_precision`` (``no``, ``fp16``, ``bf16``) is the autocast dtype of test-time adaptation (AdaMerging,
    WEMoE). ``convert_single_files=False`` refuses single-file diffusion checkpoints instead of converting them in
    memory (a shared server's choice). ``runtime`` is the processes that run this merge together (default: every process of the run;
    :data:`~hf_fusion.runtime.LOCAL` for a merge one process makes on its own, as a ``bench`` configuration).
    """
    overrides = {
        "models": models,
        "base": base,
        "method": method,
        "output": str(output) if output else None,
        "dtype": dtype,
        "device": device,
        "exclude": exclude,
        "heads": heads,
        "pool": pool,
        "tasks": tasks,
        "tokenizer": tokenizer,
        "chat_template": chat_template,
        "components": components,
        "variant": variant,
        "output_format": output_format,
        "rank": rank,
        "parameters": parameters,
        "allow_nonfinite": allow_nonfinite,
        "clamp_overflow": clamp_overflow,
    }
    checked = validate_recipe(as_recipe(recipe, overrides))
    settings = EvalSettings() if evaluate is True else evaluate or None
    push_target = _check_request(checked, settings, push, max_shard_bytes)
    options = FusionOptions(
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        show_progress=show_progress,
        max_shard_bytes=max_shard_bytes,
        budget_elements=budget_elements,
        mixed_precision=check_mixed_precision(mixed_precision, checked.recipe.device),
        convert_single_files=convert_single_files,
    )
    runtime = runtime or current()
    scratch = None if checked.recipe.output else runtime.on_main(lambda: Path(tempfile.mkdtemp(prefix="hf-fusion-")))
    target = Path(checked.recipe.output).expanduser() if checked.recipe.output else scratch / "fused"  # type: ignore[operator]
    try:
        with file_system_errors():
            options, push_target = _prepare_output(checked, target, options, push_target, token, runtime)
            started = time.perf_counter()
            result = run_fusion(
                checked, target, options, repo_id=push_target.repo_id if push_target else None, runtime=runtime
            )
    except BaseException:
        if scratch is not None and runtime.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    result = replace(result, seconds=time.perf_counter() - started)
    if settings is not None:
        result = _scored(result, settings, tasks, options, push_target, runtime)
    if push_target is None:
        return result
    pushed = runtime.on_main(
        lambda: push_folder(
            target,
            push_target,
            token=options.token,  # on failure the folder stays
            default_message=push_message(result.recipe),
        )
    )
    if scratch is not None and runtime.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
    return replace(result, push=pushed)


def run_fusion(
    checked: ValidatedRecipe,
    target: Path,
    options: FusionOptions,
    *,
    repo_id: str | None,
    runtime: Runtime | None = None,
) -> MergeResult:
    """Runs the method by its declared kind: on whole models, on every process of the run (``runtime``, by default
    the current one); or through the streaming engine, on the main process, whose result (or error) every process
    gets."""
    runtime = runtime or current()
    pipeline = runtime.on_main(lambda: is_pipeline_fusion(checked, token=options.token))
    if checked.recipe.output_format == "adapter":
        if pipeline:
            raise RecipeError(
                "--output-format adapter writes peft adapters of transformers models; diffusers pipelines are "
                "written dense (their LoRAs fuse into the pipeline's weights)."
            )
        return runtime.on_main(lambda: fuse_to_adapter(checked, target, options, repo_id=repo_id))
    if checked.spec.kind is MethodKind.MODEL_WISE:
        if pipeline:
            raise RecipeError(
                f"{checked.spec.name} works on whole transformers models; diffusers pipelines take the data-free "
                "tensor-wise methods (see `hf-fusion methods`)."
            )
        return fuse_model_wise(checked, target, options, repo_id=repo_id, runtime=runtime)
    if pipeline:
        return runtime.on_main(lambda: fuse_pipeline(checked, target, options, repo_id=repo_id))
    for name in ("components", "variant"):
        if getattr(checked.recipe, name):
            raise RecipeError(f"{name} applies to diffusers pipelines; these models are not one (no model_index.json).")
    return runtime.on_main(lambda: fuse_tensor_wise(checked, target, options, repo_id=repo_id))


def _check_request(
    checked: ValidatedRecipe, settings: EvalSettings | None, push: str | PushTarget | None, max_shard_bytes: int
) -> PushTarget | None:
    """What can be refused from the request alone, before any folder is made."""
    if settings is not None and not checked.recipe.pool:
        raise RecipeError("evaluating needs a pool that says which tasks to score: pass --pool.")
    if isinstance(push, str) and not push.strip():
        raise RecipeError("push needs a repo name (org/name, or name under your account), got an empty one.")
    target = PushTarget(push) if isinstance(push, str) else push
    if not checked.recipe.output and target is None:
        raise RecipeError("no output folder: pass --output (output=...).")
    if max_shard_bytes <= 0:
        raise RecipeError(f"the largest shard must be a positive size, got {max_shard_bytes} bytes.")
    return target


def _prepare_output(
    checked: ValidatedRecipe,
    target: Path,
    options: FusionOptions,
    push: PushTarget | None,
    token: str | None,
    runtime: Runtime,
) -> tuple[FusionOptions, PushTarget | None]:
    """The output folder and the push target, checked before any input is read; returns the options with the
    resolved token. Leftovers are cleaned by the main process before any process looks at the folder; the push
    target is checked once, on the Hub, by the main process, and its answer (or refusal) reaches every process."""
    runtime.on_main(lambda: clean_leftovers(target))
    check_output_folder(target, overwrite=options.overwrite)
    check_output_is_not_an_input(target, checked.recipe)
    options = replace(options, token=resolve_token(token))
    return options, (runtime.on_main(lambda: check_target(push, options.token)) if push is not None else None)


def _scored(
    result: MergeResult,
    settings: EvalSettings,
    tasks: list[str] | None,
    options: FusionOptions,
    push: PushTarget | None,
    runtime: Runtime,
) -> MergeResult:
    """``result`` with the fused model's scores; the merge's processes share the evaluation (one process on its own
    scores alone)."""
    started = time.perf_counter()
    settings = replace(settings, across_processes=settings.across_processes and runtime.distributed)
    report = evaluate_fused(
        result.output,
        result.recipe,
        settings,
        runtime=runtime,
        tasks=tasks,
        token=options.token,
        show_progress=options.show_progress,
        repo_id=push.repo_id if push else None,
    )
    return replace(result, evaluation=report, evaluation_seconds=time.perf_counter() - started)


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
