"""Multi-model spherical averaging: the weighted Karcher (Riemannian) mean of the models' directions.

Per tensor, each model (or, with a base, each task vector) is split into a norm and a unit direction; the
directions are averaged on the unit sphere by Riemannian gradient steps from their normalised Euclidean mean, and
the result is scaled by the weighted mean norm. For two models of equal norm this is SLERP at the weights' ratio;
mergekit's ``karcher`` is the same estimator without a base. Zero tensors have no direction: they count in the
norm, not in the mean direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.errors import RecipeError
from hf_fusion.methods.common import FROZEN
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class KarcherParams(pydantic.BaseModel):
    model_config = FROZEN
    weights: list[float] | None = pydantic.Field(
        None, description="one non-negative weight per model, in recipe order; null weighs them equally"
    )
    max_iter: int = pydantic.Field(10, ge=1, le=10_000, description="Riemannian gradient steps")
    tol: float = pydantic.Field(1e-5, gt=0.0, description="stop when the tangent step is shorter than this")


def karcher_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean direction of ``tensors`` times their weighted mean norm."""
    total = float(sum(weights))
    w = [x / total for x in weights]
    norms = [float(torch.linalg.vector_norm(t)) for t in tensors]
    scale = sum(wi * n for wi, n in zip(w, norms))
    live = [(wi, t / n) for wi, t, n in zip(w, tensors, norms) if n > 0.0 and wi > 0.0]
    if not live:
        return torch.zeros_like(tensors[0])
    live_total = sum(wi for wi, _ in live)
    live = [(wi / live_total, u) for wi, u in live]
    mean = sum(wi * u for wi, u in live)
    mean_norm = float(torch.linalg.vector_norm(mean))
    direction = mean / mean_norm if mean_norm > tol else live[0][1].clone()
    for _ in range(max_iter):
        step = torch.zeros_like(direction)
        for wi, u in live:
            cos = max(-1.0, min(1.0, float(torch.sum(direction * u))))
            angle = math.acos(cos)
            if angle > tol:
                step.add_(u - cos * direction, alpha=wi * angle / math.sin(angle))
        length = float(torch.linalg.vector_norm(step))
        if length < tol:
            break
        direction = direction * math.cos(length) + step * (math.sin(length) / length)
        direction = direction / torch.linalg.vector_norm(direction)
    return direction * scale


class KarcherMean(TensorMerge[KarcherParams]):
    elementwise = False

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        p = self.params_for(inputs)
        weights = list(p.weights) if p.weights is not None else [1.0] * self.num_models
        if inputs.base is None:
            return karcher_mean(inputs.experts, weights, p.max_iter, p.tol)
        deltas = [e - inputs.base for e in inputs.experts]
        return inputs.base + karcher_mean(deltas, weights, p.max_iter, p.tol)


def _check_weights(params: Any, num_models: int, has_base: bool) -> None:
    if params.weights is None:
        return
    if len(params.weights) != num_models:
        raise RecipeError(f"karcher_mean got {len(params.weights)} weight(s) for {num_models} model(s).")
    if not math.isfinite(sum(params.weights)):
        raise RecipeError("karcher_mean: the weights' sum overflows a float; use smaller weights.")
    if any(w < 0 for w in params.weights) or sum(params.weights) <= 0:
        raise RecipeError("karcher_mean needs non-negative weights with a positive sum.")


register(
    MethodSpec(
        name="karcher_mean",
        summary="Spherical average of any number of models (or task vectors, with a base): the Karcher mean.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.OPTIONAL,
        implementation=KarcherMean,
        params_model=KarcherParams,
        aliases=("karcher", "multi_slerp", "riemannian_mean"),
        paper=Paper(
            "Riemannian center of mass and mollifier smoothing (Karcher, 1977)",
            "https://doi.org/10.1002/cpa.3160300502",
        ),
        check_pool=_check_weights,
    )
)
