"""Scores already computed: a model scored on a task with the same settings gets the same number, so it is read
back instead of scored again. The pretrained model and the experts of a pool are scored beside every fused model,
and their scores never change; after the first run only the fused model costs anything.

An entry is keyed by everything that decides the score: the content of the model's files (for files in the Hub
cache, the content hash the blob is named by; otherwise a SHA-256 of the bytes), the task's definition, the
context it is scored in (the base and the task's expert, which lend heads, towers and tokenizers), the content of a
local dataset folder, the example limit, batch size, precision, device type and metric source, and the versions of
hf-fusion, torch, transformers, datasets and evaluate.
Entries live under ``$HF_FUSION_CACHE`` (default ``$HF_HOME/hf_fusion``) in ``scores/``, one small JSON file each,
written atomically; deleting the folder forgets them, ``--no-score-cache`` ignores them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_fusion.atomic import write_text_atomically
from hf_fusion.catalog import TaskSpec
from hf_fusion.tasks.base import EvalSettings, TaskContext
from hf_fusion.tasks.weights import ModelUnderTest
from hf_fusion.version import __version__

SCORING_VERSION = 2
"""Raised whenever a change to the evaluators can change a score, so older entries stop matching."""

CACHE_ENV = "HF_FUSION_CACHE"
_NOT_SCORED = {"README.md", "evaluation.json", "fusion_recipe.yaml", ".gitattributes"}
_BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_digests: dict[tuple[str, int, int], str] = {}


def cache_folder() -> Path:
    """Where hf-fusion keeps what it computed: ``$HF_FUSION_CACHE``, else ``$HF_HOME/hf_fusion``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf_fusion"


def file_digest(path: Path) -> str:
    """The content hash of a file: the name of its blob when it lives in the Hub cache (named by its hash), else
    its SHA-256, computed once per file version in this process."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _BLOB_NAME.fullmatch(real.name):
        return real.name
    stat = real.stat()
    memo = (str(real), stat.st_size, stat.st_mtime_ns)
    if memo not in _digests:
        digest = hashlib.sha256()
        with real.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        _digests[memo] = digest.hexdigest()
    return _digests[memo]


def folder_digest(folder: Path) -> str:
    """The content hash of the files a model is loaded from (weights, config, tokenizer; not its card or reports)."""
    entries = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in _NOT_SCORED)
    joined = "\n".join(f"{p.name}:{file_digest(p)}" for p in entries)
    return hashlib.sha256(joined.encode()).hexdigest()


def model_digest(model: ModelUnderTest) -> str:
    """A model's identity: its folder's content, and its base's where it is an adapter over it."""
    parts = [folder_digest(model.folder)]
    if model.base is not None:
        parts.append(folder_digest(model.base))
    return "+".join(parts)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "hf_fusion": __version__,
        **{name: version(name) for name in ("torch", "transformers", "datasets", "evaluate")},
    }


def data_digest(spec: TaskSpec) -> str | None:
    """The content of a task's local dataset folder (a pool file may point at one, and it may be edited); None for
    the built-in data (fixed by the package version) and Hub datasets (fixed by their id; an update made in place on
    the Hub is not noticed: score again with ``--no-score-cache``)."""
    folder = Path(spec.dataset).expanduser()
    if spec.dataset.startswith("builtin:") or not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    joined = "\n".join(f"{p.relative_to(folder)}:{file_digest(p)}" for p in files)
    return hashlib.sha256(joined.encode()).hexdigest()


@dataclass(frozen=True)
class CachedScore:
    score: float | None
    examples: int
    metric_source: str


class ScoreCache:
    """Scores of models on tasks under one set of evaluation settings."""

    def __init__(self, settings: EvalSettings, folder: Path | None = None) -> None:
        from hf_fusion.metrics import resolve_source
        from hf_fusion.tasks.base import compute_device

        self.folder = (folder or cache_folder()) / "scores"
        self._settings = {
            "limit": settings.limit,
            "batch_size": settings.batch_size,
            "mixed_precision": settings.mixed_precision,
            "device": compute_device(settings).split(":")[0],
            "metrics": resolve_source(settings.metrics),
            "scoring": SCORING_VERSION,
            **_versions(),
        }

    def key(self, model: ModelUnderTest, spec: TaskSpec, context: TaskContext) -> str:
        described = {
            "model": model_digest(model),
            "task": spec.model_dump(mode="json"),
            "data": data_digest(spec),
            "base": folder_digest(context.base),
            "expert": model_digest(context.expert),
            "heads": list(context.heads),
            **self._settings,
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> CachedScore | None:
        try:
            data: dict[str, Any] = json.loads((self.folder / f"{key}.json").read_text())
            return CachedScore(data["score"], int(data["examples"]), str(data["metric_source"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent, or unreadable: scored again and rewritten

    def put(self, key: str, entry: CachedScore) -> None:
        """Stores an entry atomically (a reader sees the old file or the new one); a cache that cannot be written
        only costs a rescore next time."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.folder / f"{key}.json", json.dumps(entry.__dict__))
        except OSError:
            pass
