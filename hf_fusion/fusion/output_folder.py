"""Finishing an output folder, the same way for every kind of method: side files, recipe, card, atomic rename."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from hf_fusion.cards import write_card
from hf_fusion.engine.dtypes import TORCH_NAMES
from hf_fusion.model_files import copy_side_files, set_config_dtype
from hf_fusion.output import AtomicFolder
from hf_fusion.recipe import OUTPUT_DTYPES, RECIPE_FILENAME, ModelRef, Recipe
from hf_fusion.version import __version__


def write_side_files(reference: Path, others: list[Path], dest: Path, dtype: str | None = None) -> None:
    """Config, tokenizer and the other allowed side files next to a fused model's weights (``dtype``, a recipe
    dtype, is recorded in the copied config)."""
    copy_side_files(reference, [f for f in others if f != reference], dest)
    code = OUTPUT_DTYPES[dtype] if dtype is not None else None
    if code is not None:
        set_config_dtype(dest, TORCH_NAMES[code])


def write_recipe(recipe: Recipe, dest: Path, notes: Sequence[str] = ()) -> None:
    """The recipe as run, with the method's ``notes`` on the run as comments after it (YAML readers skip them)."""
    comments = "".join(f"# {line}\n" for line in notes)
    (dest / RECIPE_FILENAME).write_text(
        f"# Fused with hf-fusion {__version__}. Reproduce: hf-fusion merge --config {RECIPE_FILENAME} --output DIR\n"
        + recipe.replace(output=None).to_yaml()  # where it was written is not part of what was fused
        + (f"# What the method reported:\n{comments}" if comments else "")
    )


def seal(
    atomic: AtomicFolder,
    temp: Path,
    recipe: Recipe,
    *,
    target: Path,
    repo_id: str | None,
    notes: Sequence[str] = (),
) -> list[str]:
    """Writes the recipe (with the method's notes) and the card into the finished temporary folder and renames it
    into place at ``target`` (the card's usage snippet loads the repo id, else ``target`` as the user wrote it);
    returns the file names."""
    write_recipe(recipe, temp, notes)
    write_card(temp, repo_id=repo_id, load_path=repo_id or str(target))
    files = sorted(os.listdir(temp))
    atomic.commit()
    return files


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
