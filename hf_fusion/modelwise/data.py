"""Task data for data-driven methods: calibration batches from a task's train split, endless seeded random
batches from its test split for test-time adaptation, and the entropy objective."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydantic
import torch


class CalibrationParams(pydantic.BaseModel):
    """Parameters shared by methods that read a few labelled-free examples per task (Fisher, RegMean)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    calibration_samples: int = pydantic.Field(256, gt=0, description="examples per task from its train split")
    batch_size: int = pydantic.Field(16, gt=0, description="examples per forward pass")
    seed: int = pydantic.Field(0, description="seed for anything random")


class TrainingParams(pydantic.BaseModel):
    """Parameters shared by test-time adaptation methods (AdaMerging, WEMoE)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    steps: int = pydantic.Field(1000, ge=0, description="optimisation steps (each sees one batch of every task)")
    lr: float = pydantic.Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = pydantic.Field(16, gt=0, description="unlabelled test examples per task per step")
    seed: int = pydantic.Field(0, description="seed for batch sampling and initialisation")


def calibration_batches(evaluator: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The evaluator's examples (already cut to the calibration size), encoded, in order."""
    for batch in evaluator.batches():
        yield evaluator.encode(batch)


def random_batches(evaluator: Any, batch_size: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of the evaluator's examples, reshuffled each epoch; labels are never read."""
    size = len(evaluator.data)
    while True:
        order = torch.randperm(size, generator=generator).tolist()
        for start in range(0, size - min(batch_size, size) + 1, batch_size):
            yield evaluator.encode(evaluator.data[order[start : start + batch_size]])


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the predicted class distributions (AdaMerging's and WEMoE's objective)."""
    log_probs = logits.float().log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


def token_mask(inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(batch, tokens) mask of real tokens, to keep padding out of activation statistics."""
    mask = inputs.get("attention_mask")
    return mask.bool() if mask is not None else None
