"""Weighted averaging of the fine-tuned models (FusionBench's weighted_average, mergekit's linear)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pydantic
import torch

from hf_fusion.engine.contract import Scan, TensorInputs, TensorMerge
from hf_fusion.errors import RecipeError
from hf_fusion.methods.common import FROZEN
from hf_fusion.methods.scope_alignment import ALIGNMENT_FIELD, ScopeAligner
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class WeightedAverageParams(pydantic.BaseModel):
    model_config = FROZEN
    weights: list[float] | None = pydantic.Field(
        None, description="one weight per model, in recipe order; null gives every model the same weight"
    )
    normalize: bool = pydantic.Field(True, description="divide by the sum of the weights")
    weight_scope_alignment: bool = ALIGNMENT_FIELD


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """theta = sum_t w_t theta_t, divided by sum_t w_t when ``normalize``.

    Normalised weights are divided before they multiply the tensors, so large weights (1e300) do not overflow.
    """
    if normalize:
        total_weight = sum(weights)
        weights = [w / total_weight for w in weights]
    total = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        total.add_(t, alpha=w)
    return total


class WeightedAverage(TensorMerge[WeightedAverageParams]):
    fixed_parameters = frozenset({"weight_scope_alignment"})

    def __init__(self, params: WeightedAverageParams, *, num_models: int, has_base: bool) -> None:
        super().__init__(params, num_models=num_models, has_base=has_base)
        self.aligner = ScopeAligner(self._weights(params)) if params.weight_scope_alignment else None

    @classmethod
    def fixed_for(cls, params: WeightedAverageParams) -> frozenset[str]:
        """Scope alignment averages the models' scopes with the weights once for the model: they are fixed then."""
        return cls.fixed_parameters | ({"weights"} if params.weight_scope_alignment else set())

    def task_vector_weights(self, params: WeightedAverageParams) -> list[float] | None:
        """Normalised (or summing to 1), the weighted mean of models sharing a base is the base plus the weighted
        task vectors; other weights also scale the base, which no adapter on it can express."""
        if params.weight_scope_alignment or not self.keeps_shared_values(params):
            return None
        weights = self._weights(params)
        total = sum(weights) if params.normalize else 1.0
        return [w / total for w in weights]

    def keeps_shared_values(self, params: WeightedAverageParams) -> bool:
        """Unnormalised weights that do not sum to 1 scale every tensor, the ones no model changed included."""
        return params.normalize or abs(sum(self._weights(params)) - 1.0) <= 1e-9

    def _weights(self, params: WeightedAverageParams) -> list[float]:
        """One weight per model; without weights, every model weighs 1."""
        return list(params.weights) if params.weights is not None else [1.0] * self.num_models

    def prepare(self, scan: Scan) -> None:
        if self.aligner is not None:
            self.aligner.prepare(scan)

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        p = self.params_for(inputs)
        tensors = self.aligner.align(inputs) if self.aligner is not None else inputs.experts
        return weighted_average(tensors, self._weights(p), p.normalize)


def _check_weights(params: Any, num_models: int, has_base: bool) -> None:
    if params.weights is None:
        return
    if len(params.weights) != num_models:
        raise RecipeError(
            f"weighted_average got {len(params.weights)} weight(s) for {num_models} model(s): give one per model."
        )
    if not math.isfinite(sum(params.weights)):
        raise RecipeError("weighted_average: the weights' sum overflows a float; use smaller weights.")
    if params.normalize and abs(sum(params.weights)) < 1e-12:
        raise RecipeError("weighted_average with normalize=true needs weights that do not sum to zero.")
    if params.weight_scope_alignment and sum(params.weights) <= 0:
        raise RecipeError(
            "weight_scope_alignment averages the models' scopes with the weights: their sum must be positive."
        )


SPEC = register(
    MethodSpec(
        name="weighted_average",
        summary="Weighted mean of the models' weights, optionally normalised by the sum of the weights.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.UNUSED,
        implementation=WeightedAverage,
        params_model=WeightedAverageParams,
        aliases=("linear", "weighted_averaging"),
        paper=Paper(
            "Model soups (Wortsman et al., 2022); mergekit's `linear`",
            "https://arxiv.org/abs/2203.05482",
        ),
        check_pool=_check_weights,
    )
)
