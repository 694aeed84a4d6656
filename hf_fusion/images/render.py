"""Render the same prompts and seeds with several diffusers pipelines, so their pictures differ only by the weights.

Every model runs under the reference's (the first model's) scheduler class and configuration, with the same steps,
guidance scale and size, and each picture starts from ``torch.Generator(device).manual_seed(seed)``. One pipeline is
in memory at a time. Pipelines load from safetensors only, never with remote code or a custom pipeline.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_fusion.errors import CheckpointError, IncompatibleModelsError, RecipeError
from hf_fusion.progress import progress_bar
from hf_fusion.recipe import ModelRef

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
PIPELINE_INDEX = "model_index.json"


@dataclass(frozen=True)
class RenderSettings:
    """What every model renders with; recorded beside the grid so a picture can be made again."""

    steps: int = 20
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    device: str = "cpu"
    dtype: str = "float32"

    def check(self) -> None:
        """Refuses settings a pipeline would only reject after loading (or silently round)."""
        if self.steps < 1:
            raise RecipeError(f"steps must be at least 1, got {self.steps}.")
        for name, value in (("height", self.height), ("width", self.width)):
            if value < 8 or value % 8:
                raise RecipeError(f"{name} must be a positive multiple of 8 (the VAE's scale), got {value}.")
        if self.dtype not in DTYPES:
            raise RecipeError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Rendering:
    """Pictures of each model (``images[model][row]``), rows being the prompts x seeds, prompt first."""

    labels: list[str]
    rows: list[tuple[str, int]]
    images: list[list[Image]]
    scheduler: dict[str, Any]


def picture_rows(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """Each prompt with each seed, in the grid's order: a prompt's seeds are adjacent rows."""
    return [(prompt, seed) for prompt in prompts for seed in seeds]


def check_prompts(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    """Refuses an empty grid: no prompt, a blank prompt (it would render noise), or no seed."""
    if not prompts:
        raise RecipeError("no prompts: pass --prompt TEXT or --prompts FILE (one prompt per line).")
    empty = [i for i, prompt in enumerate(prompts) if not prompt.strip()]
    if empty:
        raise RecipeError(f"prompt {empty[0] + 1} is empty; every prompt needs some text.")
    if not seeds:
        raise RecipeError("no seeds: pass at least one --seed N.")
    wrong = [seed for seed in seeds if not 0 <= seed < 2**64]
    if wrong:
        raise RecipeError(f"seeds must be from 0 to 2**64 - 1 (torch's range), got {wrong[0]}.")


def check_model(text: str) -> ModelRef:
    """The model reference; a local one must be a diffusers pipeline folder (with ``model_index.json``)."""
    ref = ModelRef.parse(text)
    if not ref.is_local:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(ref.path)
        except HFValidationError:
            raise RecipeError(f"model {text!r} is neither a folder nor a Hub repo id like org/name.") from None
        return ref
    folder = Path(ref.path).expanduser()
    if not folder.is_dir():
        raise RecipeError(f"model {text!r} is neither a folder nor a Hub repo id like org/name.")
    if not (folder / PIPELINE_INDEX).is_file():
        raise RecipeError(
            f"model folder {folder} has no {PIPELINE_INDEX}, so it is not a diffusers pipeline; pass the pipeline's "
            "top folder (the one saved by save_pretrained), not a component such as unet/."
        )
    return ref


def model_labels(refs: Sequence[ModelRef]) -> list[str]:
    """Column titles: a folder's name or a repo id, numbered when two would read the same."""
    names = [Path(ref.path).expanduser().resolve().name if ref.is_local else str(ref) for ref in refs]
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if names.count(name) == 1 else f"{name} ({seen[name]})")
    return labels


def check_inputs(
    models: Sequence[str], prompts: Sequence[str], seeds: Sequence[int], settings: RenderSettings
) -> list[ModelRef]:
    """Every check that needs no model: run before anything heavy is read."""
    if not models:
        raise RecipeError("no models to compare: name at least one pipeline folder or Hub repo id.")
    check_prompts(prompts, seeds)
    settings.check()
    return [check_model(text) for text in models]


def check_device(device: str) -> None:
    """Refuses a device torch cannot name or does not see, before a pipeline is loaded to move there."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise RecipeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device {device!r} was asked for, but torch sees no CUDA device; use --device cpu.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise RecipeError(f"device {device!r} was asked for, but torch sees no MPS device; use --device cpu.")


def _source(ref: ModelRef) -> str:
    return str(Path(ref.path).expanduser()) if ref.is_local else ref.path


def pipeline_class(ref: ModelRef, *, token: str | None = None) -> str:
    """The pipeline class named by ``model_index.json``; reads that one small file only."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(_source(ref), revision=ref.revision, token=token)
    except OSError as err:
        if err.errno is not None:
            raise
        raise CheckpointError(f"cannot read {PIPELINE_INDEX} of model {ref}: {err}") from None
    name = config.get("_class_name")
    if isinstance(name, list):  # [module in the repository, class]
        name = ".".join(str(part) for part in name)
    if not isinstance(name, str):
        raise CheckpointError(f"{PIPELINE_INDEX} of model {ref} names no pipeline class (_class_name).")
    check_no_custom_code(ref, name, config)
    return name


def check_no_custom_code(ref: ModelRef, name: str, index: dict[str, Any]) -> None:
    """Refuses a pipeline or component class that diffusers and transformers do not ship: loading it would run
    code from the model's repository."""
    import diffusers
    from diffusers import pipelines

    custom = [] if hasattr(diffusers, name) else [name]
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library = str(spec[0])
        if library not in ("diffusers", "transformers") and not hasattr(pipelines, library):  # e.g. stable_diffusion
            custom.append(f"{component} ({library}.{spec[1]})")
    if custom:
        raise RecipeError(
            f"model {ref} needs code that ships with the model, not with diffusers or transformers: "
            f"{', '.join(custom)}; hf-fusion never runs a model's own code."
        )


def check_same_pipeline_class(refs: Sequence[ModelRef], *, token: str | None = None) -> str:
    """One scheduler configuration fits one kind of pipeline: refuse a mix (SD 1.x beside SDXL) up front."""
    classes = [pipeline_class(ref, token=token) for ref in refs]
    odd = [f"{ref} is a {name}" for ref, name in zip(refs, classes) if name != classes[0]]
    if odd:
        raise IncompatibleModelsError(
            f"the models are different kinds of pipeline (the reference {refs[0]} is a {classes[0]}; "
            f"{'; '.join(odd)}); compare models of one kind."
        )
    return classes[0]


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """Hides diffusers' "Loading pipeline components" bar when progress is off, and restores it after."""
    from diffusers.utils import logging as diffusers_logging

    was_on = diffusers_logging.is_progress_bar_enabled()
    if was_on and not show:
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not show:
            diffusers_logging.enable_progress_bar()


def diffusers_dtype_keyword() -> str:
    """diffusers 0.42 renamed ``torch_dtype`` to ``dtype`` (the old name warns); older releases know only the old."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"


def load_pipeline(
    ref: ModelRef, settings: RenderSettings, *, token: str | None = None, show_progress: bool = True
) -> Any:
    """The pipeline on ``settings.device`` in ``settings.dtype``: safetensors only, no remote code."""
    import torch
    from diffusers import DiffusionPipeline

    dtype = {diffusers_dtype_keyword(): getattr(torch, settings.dtype)}
    try:
        with _loading_bars(show_progress):
            pipe = DiffusionPipeline.from_pretrained(
                _source(ref), revision=ref.revision, token=token, use_safetensors=True, trust_remote_code=False, **dtype
            )
    except OSError as err:
        if err.errno is not None:
            raise
        raise CheckpointError(
            f"cannot load the pipeline {ref}: {err} (hf-fusion reads safetensors weights only, never pickles)"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(settings.device)


def scheduler_spec(pipe: Any) -> tuple[Any, dict[str, Any]]:
    """The reference's scheduler class and configuration, to give every model the same sampler."""
    return type(pipe.scheduler), json.loads(pipe.scheduler.to_json_string())


def render_one(pipe: Any, prompt: str, seed: int, settings: RenderSettings, label: str) -> Image:
    """One picture; a pipeline that cannot draw from a prompt alone is named in the error."""
    import torch

    generator = torch.Generator(settings.device).manual_seed(seed)
    try:
        output = pipe(
            prompt=prompt,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            generator=generator,
            output_type="pil",
        )
    except (TypeError, ValueError) as err:
        raise IncompatibleModelsError(
            f"model {label} ({type(pipe).__name__}) cannot render a picture from a prompt: {err}"
        ) from None
    return output.images[0]


def release_memory(device: str) -> None:
    """Returns a dropped pipeline's memory before the next one loads (the caller deletes its last reference)."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def render(
    models: Sequence[str],
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: RenderSettings = RenderSettings(),
    *,
    token: str | None = None,
    show_progress: bool = True,
) -> Rendering:
    """Every model's picture for each prompt x seed, under the reference's scheduler; see the module docstring."""
    refs = check_inputs(models, prompts, seeds, settings)
    check_device(settings.device)
    check_same_pipeline_class(refs, token=token)
    labels = model_labels(refs)
    rows = picture_rows(prompts, seeds)
    images: list[list[Image]] = []
    scheduler: tuple[Any, dict[str, Any]] | None = None
    with progress_bar(total=len(refs) * len(rows), desc="rendering", unit="picture", disable=not show_progress) as bar:
        for ref, label in zip(refs, labels):
            pipe = load_pipeline(ref, settings, token=token, show_progress=show_progress)
            scheduler = scheduler or scheduler_spec(pipe)
            pipe.scheduler = scheduler[0].from_config(scheduler[1])
            log.debug("rendering %d pictures with %s under %s", len(rows), label, scheduler[0].__name__)
            column = []
            for prompt, seed in rows:
                column.append(render_one(pipe, prompt, seed, settings, label))
                bar.update(1)
            images.append(column)
            del pipe
            release_memory(settings.device)
    assert scheduler is not None
    return Rendering(
        labels=labels, rows=rows, images=images, scheduler={"class": scheduler[0].__name__, "config": scheduler[1]}
    )
