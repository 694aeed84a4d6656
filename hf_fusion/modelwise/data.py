"""Task data for data-driven methods: calibration batches from a task's train split, endless seeded random
batches from its test split for test-time adaptation, and the entropy objective.

Under several processes each process reads its share: whole calibration batches, or its examples of each random
batch (every process draws the same batches from the same seeded generator)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydantic
import torch

from hf_fusion.runtime import LOCAL, Runtime


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


def calibration_batches(evaluator: Any, runtime: Runtime = LOCAL) -> Iterator[dict[str, torch.Tensor]]:
    """The evaluator's examples (already cut to the calibration size), encoded, in order: under several processes,
    this process's share of the whole batches (the batches are the same whatever the number of processes)."""
    for batch in runtime.mine(list(evaluator.batches())):
        yield evaluator.encode(batch)


def random_rows(size: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of example indices in ``range(size)``, reshuffled each epoch; a shuffle is drawn from
    ``generator`` when a batch needs it, so streams sharing a generator draw in the order they are read."""
    while True:
        order = torch.randperm(size, generator=generator).tolist()
        for start in range(0, size - min(batch_size, size) + 1, batch_size):
            yield order[start : start + batch_size]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the predicted class distributions (AdaMerging's and WEMoE's objective)."""
    return row_entropies(logits).mean()


def row_entropies(logits: torch.Tensor) -> torch.Tensor:
    """The Shannon entropy of each predicted distribution (the last dimension of ``logits``), in float32."""
    log_probs = logits.float().log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def logit_rows(logits: torch.Tensor) -> int:
    """Predicted distributions in ``logits``: one per example, or per real token for causal language models."""
    return logits.numel() // logits.shape[-1] if logits.shape[-1] else 0


def entropy_share(logits: torch.Tensor, total_rows: int) -> torch.Tensor:
    """One process's part of a batch's mean entropy: the entropies of its rows of ``logits`` summed and divided by
    ``total_rows``, the rows of the whole batch over all processes; the parts add up to :func:`entropy` of the
    whole batch, and so do their gradients. Rows, not examples: a causal language model's logits have one row per
    real token, and the processes' examples do not hold the same number of tokens."""
    return row_entropies(logits).sum() / max(total_rows, 1)


def token_mask(inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(batch, tokens) mask of real tokens, to keep padding out of activation statistics."""
    mask = inputs.get("attention_mask")
    return mask.bool() if mask is not None else None
