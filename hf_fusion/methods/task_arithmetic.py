"""Task arithmetic: add the scaled sum of task vectors to the base (Ilharco et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN, scaling_factor_field
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class TaskArithmeticParams(pydantic.BaseModel):
    model_config = FROZEN
    scaling_factor: float = scaling_factor_field(0.3)


def task_vector_sum(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_t (theta_t - theta_0), as sum_t theta_t - n theta_0 to touch each input once."""
    total = experts[0] - base if len(experts) == 1 else experts[0] + experts[1]
    for e in experts[2:]:
        total.add_(e)
    if len(experts) > 1:
        total.sub_(base, alpha=len(experts))
    return total


def task_arithmetic(base: torch.Tensor, experts: Sequence[torch.Tensor], scaling_factor: float) -> torch.Tensor:
    """theta = theta_0 + lambda sum_t (theta_t - theta_0)  (Ilharco et al. 2023, eq. 1)."""
    return torch.add(base, task_vector_sum(base, experts), alpha=scaling_factor)


class TaskArithmetic(TensorMerge[TaskArithmeticParams]):
    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        return task_arithmetic(inputs.base, inputs.experts, self.params.scaling_factor)


SPEC = register(
    MethodSpec(
        name="task_arithmetic",
        summary="Base + scaling_factor * sum of task vectors (fine-tuned minus base).",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=TaskArithmetic,
        params_model=TaskArithmeticParams,
        aliases=("ta", "task_vectors", "task_vector_arithmetic"),
        paper=Paper("Editing models with task arithmetic (Ilharco et al., 2023)", "https://arxiv.org/abs/2212.04089"),
    )
)
