"""Task arithmetic: add the scaled sum of task vectors to the base (Ilharco et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN, check_per_model, model_weights_field, per_model, scaling_factor_field
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class TaskArithmeticParams(pydantic.BaseModel):
    model_config = FROZEN
    scaling_factor: float = scaling_factor_field(0.3)
    weights: list[float] | None = model_weights_field()
    normalize: bool = pydantic.Field(False, description="divide the weighted sum by the sum of the weights")


def task_vector_sum(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_t (theta_t - theta_0), each difference taken before summing: an entry no expert changed sums to exactly
    zero, so the fused model keeps the base's value there bit for bit (sum_t theta_t - n theta_0 would not)."""
    total = torch.sub(experts[0], base)
    difference = torch.empty_like(total) if len(experts) > 1 else total
    for expert in experts[1:]:
        total.add_(torch.sub(expert, base, out=difference))
    return total


def task_arithmetic(base: torch.Tensor, experts: Sequence[torch.Tensor], scaling_factor: float) -> torch.Tensor:
    """theta = theta_0 + lambda sum_t (theta_t - theta_0)  (Ilharco et al. 2023, eq. 1)."""
    return torch.add(base, task_vector_sum(base, experts), alpha=scaling_factor)


def weighted_task_vector_sum(
    base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """sum_t w_t (theta_t - theta_0), each difference taken first so that untouched entries stay exactly zero."""
    total = torch.sub(experts[0], base).mul_(weights[0])
    for expert, weight in zip(experts[1:], weights[1:]):
        total.add_(torch.sub(expert, base), alpha=weight)
    return total


class TaskArithmetic(TensorMerge[TaskArithmeticParams]):
    def task_vector_weights(self, params: TaskArithmeticParams) -> list[float] | None:
        weights = per_model(params.weights, 1.0, self.num_models)
        scale = params.scaling_factor / _normaliser(weights) if params.normalize else params.scaling_factor
        return [w * scale for w in weights]

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        p = self.params_for(inputs)
        if p.weights is None and not p.normalize:
            return task_arithmetic(inputs.base, inputs.experts, p.scaling_factor)
        weights = per_model(p.weights, 1.0, len(inputs.experts))
        scale = p.scaling_factor / _normaliser(weights) if p.normalize else p.scaling_factor
        return torch.add(inputs.base, weighted_task_vector_sum(inputs.base, inputs.experts, weights), alpha=scale)


def _normaliser(weights: Sequence[float]) -> float:
    """The sum of the weights, or 1 when it is (nearly) zero, as mergekit does."""
    total = sum(weights)
    return total if abs(total) >= 1e-8 else 1.0


def _check(params: TaskArithmeticParams, num_models: int, has_base: bool) -> None:
    check_per_model("task_arithmetic", params, ("weights",), num_models)


SPEC = register(
    MethodSpec(
        name="task_arithmetic",
        summary="Base + scaling_factor * sum of task vectors (fine-tuned minus base).",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=TaskArithmetic,
        params_model=TaskArithmeticParams,
        aliases=("ta", "task_vectors", "task_vector_arithmetic", "add_difference"),
        check_pool=_check,
        paper=Paper("Editing models with task arithmetic (Ilharco et al., 2023)", "https://arxiv.org/abs/2212.04089"),
    )
)
