"""Weight Scope Alignment (Xu et al. 2024): before averaging, move each model's tensor to a common scope.

A tensor's scope is the mean and standard deviation of its values. The target scope is the merge-weighted average
of the models' scopes, and each model's tensor is standardised and mapped onto it,
``(w_i - mu_i) / sigma_i * sigma* + mu*``, so that averaging mixes weights of one distribution. The scopes come
from one statistics pass (sums and sums of squares in float64), so the merge still streams slices. Tensors with a
single value, or a model whose tensor is constant, are left as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pydantic
import torch

from hf_fusion.engine.contract import Scan, TensorInputs

ALIGNMENT_FIELD: Any = pydantic.Field(
    False, description="align each model's per-tensor weight scope (mean, std) to their weighted average first"
)

Scope = tuple[float, float]


class ScopeAligner:
    """Per-tensor scopes of every model and the weighted target scope."""

    def __init__(self, weights: Sequence[float]) -> None:
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self._moments: dict[str, torch.Tensor] = {}
        self._scales: dict[str, tuple[list[float], list[float]] | None] = {}

    def prepare(self, scan: Scan) -> None:
        def visit(inputs: TensorInputs) -> None:
            flat = torch.stack([e.reshape(-1) for e in inputs.experts]).double()
            moments = torch.stack([flat.sum(dim=1), flat.square().sum(dim=1)]).cpu()
            previous = self._moments.get(inputs.name)
            self._moments[inputs.name] = moments if previous is None else previous + moments

        scan(visit)

    def _affine(self, inputs: TensorInputs) -> tuple[list[float], list[float]] | None:
        """(multipliers, offsets) mapping each model onto the target scope, or None to leave the tensor alone."""
        if inputs.name not in self._moments:  # computed on the tensor's first slice
            return self._scales.get(inputs.name)
        numel = math.prod(inputs.full_shape)
        moments = self._moments.pop(inputs.name)
        self._scales[inputs.name] = None
        if numel < 2:
            return None
        means = (moments[0] / numel).tolist()
        stds = [math.sqrt(max(0.0, float(s) / numel - m * m)) for s, m in zip(moments[1], means)]
        if min(stds) <= 0.0:
            return None
        target_mean = sum(w * m for w, m in zip(self.weights, means))
        target_std = sum(w * s for w, s in zip(self.weights, stds))
        multipliers = [target_std / s for s in stds]
        offsets = [target_mean - m * k for m, k in zip(means, multipliers)]
        self._scales[inputs.name] = (multipliers, offsets)
        return multipliers, offsets

    def align(self, inputs: TensorInputs) -> list[torch.Tensor]:
        """The experts of ``inputs`` mapped onto the target scope (new tensors; the inputs are left untouched)."""
        affine = self._affine(inputs)
        if affine is None:
            return list(inputs.experts)
        return [e * k + b for e, k, b in zip(inputs.experts, *affine)]
