"""MagMax: per weight, keep the task-vector value of largest magnitude (Marczak et al., ECCV 2024)."""

from __future__ import annotations

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN, scaling_factor_field
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class MagMaxParams(pydantic.BaseModel):
    model_config = FROZEN
    scaling_factor: float = scaling_factor_field(0.5)


def max_magnitude(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """tau[j] = tau_{t*}[j] with t* = argmax_t |tau_t[j]|; equal magnitudes go to the later model, as in the
    authors' code."""
    best = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return best


class MagMax(TensorMerge[MagMaxParams]):
    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        chosen = max_magnitude([expert - inputs.base for expert in inputs.experts])
        return torch.add(inputs.base, chosen, alpha=self.params_for(inputs).scaling_factor)


register(
    MethodSpec(
        name="magmax",
        summary="Base + scaling_factor * the task-vector value of largest magnitude, weight by weight.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=MagMax,
        params_model=MagMaxParams,
        aliases=("mag_max", "magmax_merging", "max_magnitude"),
        paper=Paper(
            "MagMax: leveraging model merging for seamless continual learning (Marczak et al., 2024)",
            "https://arxiv.org/abs/2407.06322",
        ),
    )
)
