"""ExPO: extrapolate past the fine-tuned model along the direction from the base (Zheng et al. 2024)."""

from __future__ import annotations

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN
from hf_fusion.methods.operations import simple_average
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class ExpoParams(pydantic.BaseModel):
    model_config = FROZEN
    extrapolation_factor: float = pydantic.Field(
        0.1,
        ge=-10.0,
        le=10.0,
        description="alpha: how far to move past the fine-tuned model, in units of its task vector",
        json_schema_extra={"ui_range": (0.0, 1.0)},
    )


def expo(base: torch.Tensor, finetuned: torch.Tensor, extrapolation_factor: float) -> torch.Tensor:
    """theta = theta_ft + alpha (theta_ft - theta_0)  (Zheng et al. 2024, eq. 2)."""
    return torch.add(finetuned, finetuned - base, alpha=extrapolation_factor)


class Expo(TensorMerge[ExpoParams]):
    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        finetuned = inputs.experts[0] if len(inputs.experts) == 1 else simple_average(inputs.experts)
        return expo(inputs.base, finetuned, self.params_for(inputs).extrapolation_factor)


SPEC = register(
    MethodSpec(
        name="expo",
        summary="Model extrapolation: fine-tuned + alpha * (fine-tuned - base); several models are averaged first.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=Expo,
        params_model=ExpoParams,
        aliases=("extrapolation", "model_extrapolation"),
        paper=Paper(
            "Weak-to-strong extrapolation expedites alignment (ExPO, Zheng et al., 2024)",
            "https://arxiv.org/abs/2404.16792",
        ),
    )
)
