"""The Diffusion tab's request and pictures: pipelines fused by a tensor-wise method, then drawn beside their inputs.

A request is a recipe (the same YAML as the Merge tab, its models diffusers pipelines) plus the prompts, seeds and
render settings a visitor typed. Everything is checked in the request, against :class:`RenderCaps` that keep a job
small enough for a CPU Space. After the merge, :func:`render_columns` draws every prompt x seed with the base, each
input and the fused pipeline through :func:`hf_fusion.images.render.render` (one pipeline in memory at a time, all
under the base's scheduler), so a row differs only by the weights; the grid is :class:`ImageComparison`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_fusion.errors import FusionError, RecipeError
from hf_fusion.images.render import RenderSettings, check_inputs
from hf_fusion.pipeline_files import MODEL_INDEX
from hf_fusion.recipe import ModelRef
from hf_fusion.registry import MethodKind, MethodSpec

if TYPE_CHECKING:
    from hf_fusion.images.comparison import ImageComparison
    from hf_fusion.recipe import Recipe

FUSED_LABEL = "fused"
COMPONENTS = ["unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"]
"""The weight components of the usual pipelines, offered as choices (none chosen: every weight component)."""
DEFAULT_PROMPTS = "a photo of a cat\na red house under a blue sky"


@dataclass(frozen=True)
class RenderCaps:
    """How much one visitor's pictures may cost on a shared CPU Space: the grid has at most ``prompts x seeds`` rows
    and ``models + 2`` columns (base, inputs, fused), each picture at most ``steps`` steps of ``size`` pixels a
    side."""

    prompts: int = 3
    seeds: int = 2
    models: int = 3
    steps: int = 10
    size: int = 256
    prompt_chars: int = 200
    default_steps: int = 4
    default_size: int = 256
    min_size: int = 32
    guidance_scale: float = 7.5
    pipeline_bytes: int = 12_000_000_000
    """The most safetensors bytes a pipeline repo may hold (every variant counted): each is loaded whole to draw."""

    def summary(self) -> str:
        """The caps in words, for the tab."""
        return (
            f"Limits on this Space: up to {self.prompts} prompts of {self.prompt_chars} characters, {self.seeds} "
            f"seeds, {self.models} models besides the base of up to {self.pipeline_bytes / 1e9:.0f} GB of weights "
            f"each, {self.steps} steps, {self.size}x{self.size} pixels; "
            f"guidance scale {self.guidance_scale:g}. Every column is drawn with the base's scheduler, from the same "
            "seeds, so a row differs only by the weights."
        )


@dataclass(frozen=True)
class DiffusionRequest:
    """A checked request: the recipe to fuse, and what to draw with which settings."""

    recipe: Recipe
    prompts: list[str]
    seeds: list[int]
    settings: RenderSettings

    @property
    def rows(self) -> int:
        """Every prompt with every seed."""
        return len(self.prompts) * len(self.seeds)

    @property
    def columns(self) -> int:
        """Each input pipeline, then the fused one."""
        return len(input_refs(self.recipe)) + 1

    @property
    def pictures(self) -> int:
        return self.rows * self.columns


def diffusion_methods(specs: Sequence[MethodSpec]) -> list[MethodSpec]:
    """The methods that fuse pipelines: tensor-wise ones that write one model (not one per input)."""
    return [
        s
        for s in specs
        if s.kind is MethodKind.TENSOR_WISE and not getattr(s.implementation, "outputs_per_model", False)
    ]


def parse_prompts(text: str | None, caps: RenderCaps) -> list[str]:
    """The visitor's prompts, one per line (blank lines skipped); the text is the prompt, never a file's name."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise RecipeError("type at least one prompt (one per line).")
    if len(prompts) > caps.prompts:
        raise RecipeError(f"{len(prompts)} prompts given; this Space draws at most {caps.prompts} per request.")
    long = [i + 1 for i, prompt in enumerate(prompts) if len(prompt) > caps.prompt_chars]
    if long:
        raise RecipeError(f"prompt {long[0]} is longer than {caps.prompt_chars} characters.")
    return prompts


def parse_seeds(text: str | None, caps: RenderCaps) -> list[int]:
    """Whole numbers from 0 to 2**64 - 1, separated by commas or spaces."""
    words = (text or "").replace(",", " ").split()
    if not words:
        raise RecipeError("give at least one seed, e.g. `0` or `0, 1`.")
    if len(words) > caps.seeds:
        raise RecipeError(f"{len(words)} seeds given; this Space draws at most {caps.seeds} per request.")
    seeds = []
    for word in words:
        if not (word.isascii() and word.isdigit()) or int(word) >= 2**64:
            shown = word if len(word) <= 24 else word[:21] + "..."
            raise RecipeError(f"seed {shown!r} is not a whole number from 0 to 2**64 - 1.")
        seeds.append(int(word))
    return seeds


def _whole(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{name} must be a whole number from {low} to {high}, got {value!r}.")
    if value != int(value) or not low <= value <= high:
        raise RecipeError(f"{name} must be a whole number from {low} to {high}, got {value:g}.")
    return int(value)


def render_settings(steps: Any, size: Any, caps: RenderCaps, device: str) -> RenderSettings:
    """Square pictures of ``size`` pixels (a multiple of 8) in ``steps`` steps, within the caps."""
    steps = _whole(steps, "steps", 1, caps.steps)
    size = _whole(size, "the picture size", caps.min_size, caps.size)
    if size % 8:
        raise RecipeError(f"the picture size must be a multiple of 8 (the VAE's scale), got {size}.")
    settings = RenderSettings(
        steps=steps, guidance_scale=caps.guidance_scale, height=size, width=size, device=device, dtype="float32"
    )
    settings.check()
    return settings


def check_pipeline_method(name: Any, methods: Sequence[MethodSpec]) -> None:
    """Refuses a method that does not fuse pipelines, before the recipe's validation asks for what that method
    needs (a pool, data); an unknown name is left to the validation, which suggests a spelling."""
    from hf_fusion.registry import get_method

    if not isinstance(name, str):
        return
    try:
        spec = get_method(name)
    except FusionError:
        return
    if spec not in methods:
        raise RecipeError(
            f"{spec.name} does not fuse diffusers pipelines here; the Diffusion tab takes the tensor-wise methods "
            f"that write one model: {', '.join(s.name for s in methods)}."
        )


def check_pipeline_recipe(recipe: Recipe, methods: Sequence[MethodSpec], caps: RenderCaps) -> None:
    """What the Diffusion tab fuses: pipelines named by the recipe itself (no pool), a method that fuses them, and
    no more models than the caps draw."""
    check_pipeline_method(recipe.method, methods)
    if recipe.pool:
        raise RecipeError(
            "the Diffusion tab fuses pipelines named by repo id (`models` and `base`), not a pool's models."
        )
    if len(recipe.models) > caps.models:
        raise RecipeError(
            f"{len(recipe.models)} models besides the base; this Space fuses and draws at most {caps.models}."
        )


def prepare_request(
    recipe: Recipe, prompts_text: str, seeds_text: str, steps: Any, size: Any, *, caps: RenderCaps, device: str
) -> DiffusionRequest:
    """A validated recipe and the visitor's render inputs, checked against the caps before anything is fetched."""
    request = DiffusionRequest(
        recipe=recipe,
        prompts=parse_prompts(prompts_text, caps),
        seeds=parse_seeds(seeds_text, caps),
        settings=render_settings(steps, size, caps, device),
    )
    check_inputs([str(m) for m in input_refs(recipe)], request.prompts, request.seeds, request.settings)
    return request


def input_refs(recipe: Recipe) -> list[ModelRef]:
    """The recipe's pipelines in column order: the base (when there is one), then the models."""
    return [*([recipe.base] if recipe.base is not None else []), *recipe.models]


def check_pipelines(recipe: Recipe, *, token: str | None, caps: RenderCaps | None = None) -> None:
    """Every input is a diffusers pipeline (from its listing), so the merge does not start on models that cannot be
    drawn, and no larger than the caps allow (each is loaded whole to draw); LoRAs, which the Merge tab fuses, are
    not drawn here."""
    from hf_fusion.fusion.pipelines import is_pipeline
    from hf_fusion.hub.resolve import list_hub_repo

    caps = caps or RenderCaps()
    for ref in input_refs(recipe):
        if not is_pipeline(ref, token=token):
            raise RecipeError(
                f"{ref} is not a diffusers pipeline (no {MODEL_INDEX}); the Diffusion tab fuses and draws whole "
                "pipelines (fuse a LoRA in the Merge tab)."
            )
        if not ref.is_local:
            weights = sum(
                size for name, size in list_hub_repo(ref, token=token).sizes.items() if name.endswith(".safetensors")
            )
            if weights > caps.pipeline_bytes:
                raise RecipeError(
                    f"{ref} holds {weights / 1e9:.1f} GB of weights; this Space draws pipelines of up to "
                    f"{caps.pipeline_bytes / 1e9:.0f} GB (run hf-fusion yourself for larger ones)."
                )


def _pinned(ref: ModelRef) -> str:
    """The reference to draw: the commit the merge read when it recorded one."""
    return f"{ref.path}@{ref.pinned}" if ref.pinned and not ref.is_local else ref.path


def render_columns(
    request: DiffusionRequest, merged: Recipe, fused: Path, *, token: str | None, show_progress: bool = False
) -> ImageComparison:
    """Each prompt x seed drawn by the base, every input and the fused pipeline at ``fused``; ``merged`` is the
    recipe the merge recorded (its Hub inputs pinned to the commits it read). Columns are titled with the visitor's
    own names, and the fused one ``fused (method)``: no server path reaches the grid."""
    from hf_fusion.images.comparison import ImageComparison
    from hf_fusion.images.render import render

    drawn = [*(_pinned(ref) for ref in input_refs(merged)), str(fused)]
    rendering = render(
        drawn, request.prompts, request.seeds, request.settings, token=token, show_progress=show_progress
    )
    names = [str(ref) for ref in input_refs(request.recipe)]
    labels = [*_unique(names), f"{FUSED_LABEL} ({request.recipe.method})"]
    return ImageComparison(
        models=[*names, FUSED_LABEL],
        labels=labels,
        prompts=request.prompts,
        seeds=request.seeds,
        settings=request.settings,
        scheduler=rendering.scheduler,
        images=rendering.images,
    )


def _unique(names: list[str]) -> list[str]:
    """Column titles, numbered when a pipeline appears twice."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if names.count(name) == 1 else f"{name} ({seen[name]})")
    return out
