"""Diffusers pipeline folders: ``model_index.json``, one subfolder per component, and what travels to the output.

A pipeline is several weight sets (the UNet or transformer, text encoders, VAE), each a model folder of its own
(``config.json`` and safetensors), plus parts without weights (scheduler, tokenizers, feature extractor). The
fusion reads each weight set like a transformers model; the other parts are copied from the reference pipeline,
file by file from an allow-list, so nothing else in an input (code, notes, pickles) reaches an output.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_fusion.engine.checkpoint import choose_weight_files, read_weight_map
from hf_fusion.errors import CheckpointError
from hf_fusion.model_files import PROCESSOR_FILES, TOKENIZER_FILES, confinement_root

MODEL_INDEX = "model_index.json"

COMPONENT_SIDE_FILES = ("config.json", "scheduler_config.json", *TOKENIZER_FILES, *PROCESSOR_FILES)
"""What a component subfolder may carry to the output besides weights."""
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


@dataclass(frozen=True)
class PipelineIndex:
    """A pipeline's ``model_index.json``: its class and its components as ``name -> (library, class)``."""

    class_name: str
    components: dict[str, tuple[str, str]]

    def describe(self) -> str:
        return self.class_name


def parse_model_index(text: str, label: str) -> PipelineIndex:
    """Reads ``model_index.json``; a component whose entry is ``[null, null]`` is absent from the pipeline.

    Component names become folder names, so one that is absolute, climbs out or holds a separator is refused.
    """
    try:
        data = json.loads(text)
    except ValueError as err:
        raise CheckpointError(f"{label}: {MODEL_INDEX} is not valid JSON ({err}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise CheckpointError(f"{label}: {MODEL_INDEX} does not name a pipeline class (_class_name).")
    components: dict[str, tuple[str, str]] = {}
    for name, value in data.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if library is None or class_name is None:
            continue
        if not _COMPONENT_NAME.match(name) or name in (".", ".."):
            raise CheckpointError(f"{label}: {MODEL_INDEX} names a component {name!r} that is not a folder name.")
        components[name] = (str(library), str(class_name))
    return PipelineIndex(data["_class_name"], components)


def read_model_index(folder: Path, label: str) -> PipelineIndex | None:
    """The pipeline index of a local folder, or None when the folder is not a diffusers pipeline."""
    path = folder / MODEL_INDEX
    if not path.is_file():
        return None
    return parse_model_index(path.read_text(), label)


def weight_components(index: PipelineIndex, files: Iterable[str]) -> list[str]:
    """The components that hold weights (a subfolder with a ``config.json`` and weight files), in index order;
    schedulers, tokenizers and feature extractors have none."""
    files = set(files)
    found = []
    for name in index.components:
        inside = [f[len(name) + 1 :] for f in files if f.startswith(f"{name}/")]
        top = [f for f in inside if "/" not in f]
        if "config.json" in top and any(f.endswith(_WEIGHT_SUFFIXES) for f in top):
            found.append(name)
    return found


def local_files(folder: Path) -> list[str]:
    """Relative paths of the files in a pipeline folder, one level of subfolders deep (what the index can name)."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    for sub in folder.iterdir():
        if sub.is_dir():
            names += [f"{sub.name}/{p.name}" for p in sub.iterdir() if p.is_file()]
    return names


def is_component_side_file(path: str, component: str) -> bool:
    """Whether ``path`` (relative to the pipeline) is a file of ``component`` the output carries besides weights."""
    folder, _, name = path.partition("/")
    return folder == component and "/" not in name and any(fnmatch.fnmatchcase(name, p) for p in COMPONENT_SIDE_FILES)


def copy_component(source: Path, dest: Path, *, weights: bool, label: str, variant: str | None = None) -> list[str]:
    """Copies a component the fusion does not read: its allow-listed files and, for a weight component, the
    safetensors weights it would load (plain files over a variant; a variant written under the plain name, so the
    output loads without ``variant=``). Links are followed only inside the model's own folder or cache entry; a
    missing folder, a link out, or pickle-only weights are refused rather than leaving a folder that does not load.
    Returns the written names."""
    root = confinement_root(source.parent)
    if not source.is_dir():
        raise CheckpointError(f"{label}: its {source.name}/ folder is missing, though {MODEL_INDEX} names it.")
    if not source.resolve().is_relative_to(root):
        raise CheckpointError(f"{label}: {source.name}/ links outside the model's folder; it is not copied.")
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    wanted = {n: n for n in names if is_component_side_file(f"{source.name}/{n}", source.name)}
    if weights:
        wanted.update(_weight_files(source, names, label, variant))
    for name, written in wanted.items():
        path = source / name
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise CheckpointError(f"{label}: {source.name}/{name} links outside the model's folder; it is not copied.")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / written)
    return sorted(wanted.values())


def _weight_files(source: Path, names: list[str], label: str, variant: str | None) -> dict[str, str]:
    """The weights a loader reads from ``source``, each with the name it gets in the output."""
    try:
        kind, files, index = choose_weight_files(names, variant)
    except CheckpointError as err:
        raise CheckpointError(f"{label}: {source.name}/: {err}") from None
    if kind != "safetensors":
        raise CheckpointError(
            f"{label}: {source.name}/ holds pickle weights only, which an output does not carry; fuse it too "
            "(--components) with --allow-pickle, or use a safetensors revision."
        )
    if index is None:
        return {files[0]: f"{files[0].split('.')[0]}.safetensors"}
    shards = dict.fromkeys(read_weight_map(source / index).values())
    return {index: f"{index.split('.')[0]}.safetensors.index.json", **{shard: shard for shard in shards}}


def write_model_index(reference: Path, dest: Path) -> dict[str, Any]:
    """The output's ``model_index.json``: the reference pipeline's, without custom pipeline code references."""
    data = json.loads((reference / MODEL_INDEX).read_text())
    for key in ("_name_or_path", "custom_pipeline"):
        data.pop(key, None)
    (dest / MODEL_INDEX).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data
