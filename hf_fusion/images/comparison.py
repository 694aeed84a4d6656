"""Compare diffusion models by their pictures: render the same prompts and seeds, score each model with CLIP, and
save a labelled PNG grid with a JSON record beside it (prompts, seeds, models, settings, scores, cell positions)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_fusion.atomic import write_atomically, write_text_atomically
from hf_fusion.errors import FileSystemError, OutputExistsError, RecipeError
from hf_fusion.images.clip import check_clip_model, clip_scores
from hf_fusion.images.grid import GridLayout, grid_layout, image_grid, row_label
from hf_fusion.images.render import RenderSettings, check_inputs, picture_rows, render
from hf_fusion.output import nearest_existing
from hf_fusion.version import __version__

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass
class ImageComparison:
    """Pictures of several models (``images[model][row]``) for the same prompts x seeds, with each model's mean
    CLIP score when one was computed."""

    models: list[str]
    labels: list[str]
    prompts: list[str]
    seeds: list[int]
    settings: RenderSettings
    scheduler: dict[str, Any]
    images: list[list[Image]]
    clip_model: str | None = None
    clip_scores: dict[str, float] | None = None

    @property
    def rows(self) -> list[tuple[str, int]]:
        return picture_rows(self.prompts, self.seeds)

    def row_labels(self) -> list[str]:
        return [row_label(prompt, seed) for prompt, seed in self.rows]

    def layout(self) -> GridLayout:
        return grid_layout(self.images, self.labels, self.row_labels())

    def grid(self) -> Image:
        return image_grid(self.images, self.labels, self.row_labels())

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: enough to render every picture again, and to find each one in the grid."""
        layout = self.layout()
        scores = self.clip_scores or {}
        return {
            "prompts": self.prompts,
            "seeds": self.seeds,
            "models": [
                {"model": model, "label": label, "clip_score": scores.get(label)}
                for model, label in zip(self.models, self.labels)
            ],
            "settings": {**self.settings.to_dict(), "scheduler": self.scheduler},
            "clip_model": self.clip_model,
            "grid": {
                "columns": self.labels,
                "rows": [{"prompt": prompt, "seed": seed} for prompt, seed in self.rows],
                "cell_size": [layout.cell_width, layout.cell_height],
                "first_cell": list(layout.cell(0, 0)[:2]),
            },
            "hf_fusion_version": __version__,
        }

    def save(self, output: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Writes the grid to ``output`` and the record beside it, each whole or not at all."""
        check_output(output, overwrite=overwrite)
        output.parent.mkdir(parents=True, exist_ok=True)
        picture = write_png_atomically(output, self.grid())
        record = write_text_atomically(record_path(output), json.dumps(self.to_dict(), indent=2) + "\n")
        return picture, record


def record_path(output: Path) -> Path:
    """The JSON beside the grid: ``grid.png`` -> ``grid.json``."""
    return output.with_suffix(".json")


def check_output(output: Path, *, overwrite: bool) -> None:
    """Refuses, before any model loads: a name that is not a ``.png``, an existing grid or record (unless
    ``overwrite``), a folder in the way, and a place the user cannot write to."""
    if output.suffix.lower() != ".png":
        raise RecipeError(f"the output {output} must be a .png file (the JSON record is written beside it).")
    for path in (output, record_path(output)):
        if path.is_dir():
            raise OutputExistsError(f"{path} is a folder; choose another output file name.")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it.")
    existing = nearest_existing(output.parent)
    if not existing.is_dir():
        raise OutputExistsError(f"cannot write {output}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FileSystemError(
            f"cannot write {output}: permission denied in {existing}; choose a folder you can write to."
        )


def write_png_atomically(path: Path, picture: Image) -> Path:
    """Saves ``picture`` as PNG so a reader never sees half a picture."""
    return write_atomically(path, lambda partial: picture.save(partial, format="PNG"))


def read_prompts(path: Path) -> list[str]:
    """The prompts of a text file, one per line; blank lines are skipped, so a file can group prompts."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"prompts file {path} not found; pass a text file with one prompt per line.") from None
    except IsADirectoryError:
        raise RecipeError(f"prompts file {path} is a folder; pass a text file with one prompt per line.") from None
    except UnicodeDecodeError:
        raise RecipeError(f"prompts file {path} is not UTF-8 text.") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise RecipeError(f"prompts file {path} holds no prompt (it is empty or blank).")
    return prompts


def compare_images(
    models: Sequence[str],
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: RenderSettings = RenderSettings(),
    *,
    clip_model: str | None = None,
    token: str | None = None,
    show_progress: bool = True,
) -> ImageComparison:
    """Renders every model's pictures (the first model is the reference whose scheduler all use), then scores them
    with ``clip_model`` unless it is None. Every cheap check runs before the first model loads."""
    check_inputs(models, prompts, seeds, settings)
    if clip_model is not None:
        check_clip_model(clip_model)
    rendering = render(models, prompts, seeds, settings, token=token, show_progress=show_progress)
    scores = None
    if clip_model is not None:
        row_prompts = [prompt for prompt, _ in rendering.rows]
        scores = clip_scores(
            rendering.images, rendering.labels, row_prompts, clip_model=clip_model, device=settings.device
        )
    return ImageComparison(
        models=list(models),
        labels=rendering.labels,
        prompts=list(prompts),
        seeds=list(seeds),
        settings=settings,
        scheduler=rendering.scheduler,
        images=rendering.images,
        clip_model=clip_model,
        clip_scores=scores,
    )
