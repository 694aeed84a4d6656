"""Spherical linear interpolation between two models, tensor by tensor (as in mergekit and FusionBench)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pydantic
import torch

from hf_fusion.engine.contract import Scan, TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN, check_two_models, interpolation_field, two_model_endpoints
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


@dataclass
class _Moments:
    """Sums over one tensor of both endpoints: squares of each and their products (float64, slice by slice)."""

    start_sq: float = 0.0
    end_sq: float = 0.0
    product: float = 0.0

    def add(self, start: torch.Tensor, end: torch.Tensor) -> None:
        start, end = start.double(), end.double()
        self.start_sq += float(torch.dot(start.reshape(-1), start.reshape(-1)))
        self.end_sq += float(torch.dot(end.reshape(-1), end.reshape(-1)))
        self.product += float(torch.dot(start.reshape(-1), end.reshape(-1)))


def slerp_coefficients(moments: _Moments, t: float, dot_threshold: float, epsilon: float) -> tuple[float, float]:
    """(c0, c1) with theta = c0 theta_0 + c1 theta_1: sin((1-t) Omega)/sin(Omega) and sin(t Omega)/sin(Omega), Omega
    the angle between the flattened tensors; (1 - t, t) where they are (nearly) colinear and the arc is undefined."""
    norm0, norm1 = math.sqrt(moments.start_sq), math.sqrt(moments.end_sq)
    dot = moments.product / ((norm0 if norm0 > epsilon else 1.0) * (norm1 if norm1 > epsilon else 1.0))
    if not abs(dot) <= dot_threshold:  # colinear, or a NaN angle: no arc to follow
        return 1.0 - t, t
    omega = math.acos(max(-1.0, min(1.0, dot)))
    sin_omega = math.sin(omega)
    if sin_omega < 1e-12:  # dot_threshold=1 lets exactly colinear tensors through
        return 1.0 - t, t
    return math.sin(omega - omega * t) / sin_omega, math.sin(omega * t) / sin_omega


def slerp(start: torch.Tensor, end: torch.Tensor, t: float, dot_threshold: float, epsilon: float) -> torch.Tensor:
    """SLERP of two whole tensors (see :func:`slerp_coefficients`)."""
    moments = _Moments()
    moments.add(start, end)
    c0, c1 = slerp_coefficients(moments, t, dot_threshold, epsilon)
    return torch.add(start * c0, end, alpha=c1)


class Slerp(TensorMerge[SlerpParams]):
    """The angle of each tensor comes from a statistics pass (norms and the dot product, summed slice by slice), so
    the merge itself is element-wise and streams in slices like task arithmetic, whatever the tensor's size."""

    def __init__(self, params: SlerpParams, *, num_models: int, has_base: bool) -> None:
        super().__init__(params, num_models=num_models, has_base=has_base)
        self._moments: dict[str, _Moments] = {}

    def prepare(self, scan: Scan) -> None:
        def visit(inputs: TensorInputs) -> None:
            self._moments.setdefault(inputs.name, _Moments()).add(*two_model_endpoints(inputs))

        scan(visit)

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        start, end = two_model_endpoints(inputs)
        p = self.params_for(inputs)
        c0, c1 = slerp_coefficients(self._moments[inputs.name], p.t, p.dot_threshold, p.epsilon)
        return torch.add(start * c0, end, alpha=c1)


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
