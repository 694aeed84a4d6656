"""Linear interpolation between two models (weight interpolation, Wortsman et al. 2022 WiSE-FT)."""

from __future__ import annotations

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN, check_two_models, interpolation_field, two_model_endpoints
from hf_fusion.methods.operations import linear_interpolation
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class LinearInterpolationParams(pydantic.BaseModel):
    model_config = FROZEN
    t: float = interpolation_field()


class LinearInterpolation(TensorMerge[LinearInterpolationParams]):
    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        start, end = two_model_endpoints(inputs)
        return linear_interpolation(start, end, self.params_for(inputs).t)


SPEC = register(
    MethodSpec(
        name="linear_interpolation",
        summary="(1 - t) * first + t * second, between the base and one model or between two models.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.OPTIONAL,
        implementation=LinearInterpolation,
        params_model=LinearInterpolationParams,
        aliases=("lerp", "interpolation", "wise_ft"),
        paper=Paper(
            "Robust fine-tuning of zero-shot models (WiSE-FT, Wortsman et al., 2022)",
            "https://arxiv.org/abs/2109.01903",
        ),
        check_pool=check_two_models,
    )
)
