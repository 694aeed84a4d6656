"""What every task kind shares: settings, the task's context (base, its expert, heads), batching, scoring."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from hf_fusion.catalog import TaskSpec
from hf_fusion.metrics import MetricSource, load_metric
from hf_fusion.progress import check_stop
from hf_fusion.runtime import LOCAL, Runtime, autocast
from hf_fusion.tasks.data import load_examples
from hf_fusion.tasks.weights import ModelUnderTest, release


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
        """All examples in order, a batch at a time (calibration data of data-driven methods)."""
        size = self.settings.batch_size
        for start in range(0, len(self.data), size):
            check_stop()
            yield self.data[start : start + size]

    def example_lengths(self) -> list[int] | None:
        """Each example's length in tokens, for tasks whose batches are padded to their longest example; None
        where every example has the same size (images)."""
        return None

    @cached_property
    def batch_plan(self) -> list[list[int]]:
        """Example indices of each scoring batch: longest examples first (a memory error shows at once), so that
        each batch holds examples of similar length and pads little. The plan depends on the data alone, never on
        the number of processes, so every example is scored in the same batch however the work is split; it is
        made once per evaluator (the texts are tokenised once), whatever the number of models scored."""
        lengths = self.example_lengths()
        order = list(range(len(self.data)))
        if lengths is not None:
            order.sort(key=lambda i: -lengths[i])
        size = self.settings.batch_size
        return [order[start : start + size] for start in range(0, len(order), size)]

    @abstractmethod
    def network(self, model: ModelUnderTest) -> Any:
        """``model`` ready to score this task (with the task's head or tower where it has one), on its device."""

    @abstractmethod
    def predict(self, network: Any, batch: dict[str, list[Any]]) -> tuple[list[Any], list[Any]]:
        """Predictions and references of one batch of examples."""

    def metric_arguments(self) -> dict[str, Any]:
        """Extra arguments of the metric's ``compute``."""
        return {}

    def predictions(
        self, model: ModelUnderTest, *, runtime: Runtime = LOCAL, on_batch: Callable[[int], None] | None = None
    ) -> tuple[list[Any], list[Any], dict[str, Any]]:
        """(predictions, references, extra metric arguments) of ``model`` on every example, in the data's order.
        Each process of ``runtime`` scores its share of the batches; every process gets all predictions."""
        network = self.network(model)
        scored: list[tuple[list[int], list[Any], list[Any]]] = []
        try:
            with torch.inference_mode(), autocast(compute_device(self.settings), self.settings.mixed_precision):
                for indices in runtime.mine(self.batch_plan):
                    check_stop()
                    predicted, references = self.predict(network, self.data[indices])
                    scored.append((indices, predicted, references))
                    if on_batch is not None:
                        on_batch(len(indices))
        finally:
            release(network)
        del network
        by_index: dict[int, tuple[Any, Any]] = {}
        for indices, predicted, references in runtime.interleaved(scored):
            by_index.update(zip(indices, zip(predicted, references)))
        ordered = [by_index[i] for i in range(len(self.data))]
        return [p for p, _ in ordered], [r for _, r in ordered], self.metric_arguments()

    def score(
        self, model: ModelUnderTest, *, runtime: Runtime = LOCAL, on_batch: Callable[[int], None] | None = None
    ) -> float:
        """The task's metric on ``model``, computed once (by the main process) from every process's predictions."""
        predictions, references, extra = self.predictions(model, runtime=runtime, on_batch=on_batch)
        value = None
        if runtime.is_main:
            result = self.metric.compute(predictions=predictions, references=references, **extra)
            value = float(result[self.spec.metric])
        return runtime.broadcast(value)  # type: ignore[return-value]


def compute_device(settings: EvalSettings) -> str:
    """Where the forward passes run: the GPUs when accelerate places the model over them, else the device."""
    if settings.device_map is not None and torch.cuda.is_available():
        return "cuda"
    return settings.device


def text_lengths(tokenizer: Any, columns: list[list[str]], max_length: int | None) -> list[int]:
    """Token counts of each example's text (pairs counted together), truncated as the task truncates them."""
    encoded = tokenizer(*[list(column) for column in columns], truncation=True, max_length=max_length)
    return [len(ids) for ids in encoded["input_ids"]]


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
