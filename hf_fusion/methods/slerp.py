"""Spherical linear interpolation between two models, tensor by tensor (as in mergekit and FusionBench)."""

from __future__ import annotations

import math

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN, check_two_models, interpolation_field, two_model_endpoints
from hf_fusion.methods.operations import linear_interpolation
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class SlerpParams(pydantic.BaseModel):
    model_config = FROZEN
    t: float = interpolation_field()
    dot_threshold: float = pydantic.Field(
        0.9995,
        ge=0.0,
        le=1.0,
        validation_alias=pydantic.AliasChoices("dot_threshold", "DOT_THRESHOLD"),
        description="above this |cosine| the two tensors count as colinear and are interpolated linearly",
    )
    epsilon: float = pydantic.Field(1e-8, gt=0.0, description="norms below this are not normalised")


def slerp(start: torch.Tensor, end: torch.Tensor, t: float, dot_threshold: float, epsilon: float) -> torch.Tensor:
    """theta = sin((1-t) Omega)/sin(Omega) theta_0 + sin(t Omega)/sin(Omega) theta_1, Omega the angle between them.

    The angle is taken between the flattened tensors; nearly colinear tensors fall back to linear interpolation.
    """
    norm0, norm1 = torch.linalg.vector_norm(start), torch.linalg.vector_norm(end)
    unit0 = start / norm0 if norm0 > epsilon else start
    unit1 = end / norm1 if norm1 > epsilon else end
    dot = float(torch.sum(unit0 * unit1))
    if not abs(dot) <= dot_threshold:  # colinear, or a NaN angle: no arc to follow
        return linear_interpolation(start, end, t)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    sin_omega = math.sin(omega)
    if sin_omega < 1e-12:  # dot_threshold=1 lets exactly colinear tensors through
        return linear_interpolation(start, end, t)
    return torch.add(start * (math.sin(omega - omega * t) / sin_omega), end, alpha=math.sin(omega * t) / sin_omega)


class Slerp(TensorMerge[SlerpParams]):
    elementwise = False

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        start, end = two_model_endpoints(inputs)
        p = self.params_for(inputs)
        return slerp(start, end, p.t, p.dot_threshold, p.epsilon)


SPEC = register(
    MethodSpec(
        name="slerp",
        summary="Spherical interpolation per tensor between the base and one model, or between two models.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.OPTIONAL,
        implementation=Slerp,
        params_model=SlerpParams,
        aliases=("spherical_interpolation", "slerp_merge"),
        paper=Paper(
            "Animating rotation with quaternion curves (Shoemake, 1985); used for LLM merging by mergekit",
            "https://dl.acm.org/doi/10.1145/325165.325242",
        ),
        check_pool=check_two_models,
    )
)
