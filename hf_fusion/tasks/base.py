"""What every task kind shares: settings, the task's context (base, its expert, heads), batching, scoring."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from hf_fusion.catalog import TaskSpec
from hf_fusion.metrics import MetricSource, load_metric
from hf_fusion.progress import check_stop
from hf_fusion.tasks.data import load_examples
from hf_fusion.tasks.weights import ModelUnderTest


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 32
    device: str = "cpu"
    limit: int | None = None
    metrics: MetricSource = "auto"
    mixed_precision: str = "no"
    """Autocast dtype of the forward passes (``no``, ``fp16``, ``bf16``); scores may move slightly."""
    device_map: str | None = None
    """``auto`` (or ``balanced``, ``sequential``): models placed across GPUs, CPU and disk by accelerate."""
    max_memory: dict[int | str, int] | None = None
    """With ``device_map``: bytes each device may hold (GPU index, ``cpu``)."""
    across_processes: bool = True
    """Split each task's examples over the run's processes; off where the caller already split the work."""
    score_cache: bool = True
    """Reuse the scores of a model already scored with these settings (see :mod:`hf_fusion.tasks.score_cache`)."""


@dataclass(frozen=True)
class TaskContext:
    """The pool around a task: the pretrained base, the task's own expert, and the per-task head patterns."""

    base: Path
    expert: ModelUnderTest
    heads: tuple[str, ...] = ()


class TaskEvaluator(ABC):
    """Scores models on one task; the data and anything shared between models are prepared once."""

    def __init__(self, spec: TaskSpec, context: TaskContext, settings: EvalSettings) -> None:
        self.spec = spec
        self.context = context
        self.settings = settings
        self.data = load_examples(spec, settings.limit)

    @cached_property
    def _loaded_metric(self) -> tuple[Any, str]:
        """The ``evaluate`` module and where it came from, loaded on first use (methods that only read the task's
        inputs never score)."""
        return load_metric(self.spec.metric, self.settings.metrics)

    @property
    def metric(self) -> Any:
        return self._loaded_metric[0]

    @property
    def metric_source(self) -> str:
        return self._loaded_metric[1]

    def task_network(self, backbone: Any) -> Any:
        """The network that scores this task with ``backbone`` standing in for the model under test (a fused
        ensemble or mixture, or a backbone under training); by default the model is its own task network
        (text-to-text, causal LM), and tasks with heads or a frozen tower wrap it."""
        return backbone.to(self.settings.device)

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        size = self.settings.batch_size
        for start in range(0, len(self.data), size):
            check_stop()
            yield self.data[start : start + size]

    @abstractmethod
    def predictions(self, model: ModelUnderTest) -> tuple[list[Any], list[Any], dict[str, Any]]:
        """(predictions, references, extra metric arguments) of ``model`` on the task's examples."""

    def score(self, model: ModelUnderTest) -> float:
        predictions, references, extra = self.predictions(model)
        result = self.metric.compute(predictions=predictions, references=references, **extra)
        return float(result[self.spec.metric])


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)


def tokenizer_for(*folders: Path | None) -> Any:
    """The first tokenizer found among ``folders``, with a pad token (GPT-2 style models have none).

    Only folders holding tokenizer files count: transformers 5 builds an empty default tokenizer from a bare
    config, which would silently tokenize everything to unknown tokens.
    """
    from transformers import AutoTokenizer

    for folder in folders:
        if folder is None or not any((folder / name).is_file() for name in TOKENIZER_FILES):
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError):
            continue
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    from hf_fusion.errors import FusionError

    raise FusionError(f"no tokenizer in {', '.join(str(f) for f in folders if f)}.")
