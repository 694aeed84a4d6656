"""Model Breadcrumbs: drop each task vector's smallest values and its largest outliers, tensor by tensor, then
add the rest to the base (Davari & Belilovsky, ECCV 2024).

Per tensor and model, ``gamma`` of the values (the largest magnitudes) and then enough of the smallest to leave
``density`` of them are zeroed; ``theta_0 + lambda * sum_t masked(tau_t)``. Ranking is exact (a stable sort of the
magnitudes), so ties resolve the same way on every device.
"""

from __future__ import annotations

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN, scaling_factor_field
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class BreadcrumbsParams(pydantic.BaseModel):
    model_config = FROZEN
    scaling_factor: float = scaling_factor_field(0.3)
    density: float = pydantic.Field(
        0.9, gt=0.0, le=1.0, description="share of each task vector kept", json_schema_extra={"ui_range": (0.05, 1.0)}
    )
    gamma: float = pydantic.Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="share of each task vector's largest magnitudes dropped as outliers",
        json_schema_extra={"ui_range": (0.0, 0.2)},
    )


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Boolean mask keeping ranks ``[bottom, numel - top)`` of ``|delta|`` in ascending order.

    ``top = floor(gamma * numel)`` outliers and ``bottom = numel - floor(density * numel) - top`` small values are
    dropped; when density + gamma exceed 1, fewer outliers are dropped so that ``density`` is kept.
    """
    numel = delta.numel()
    keep = int(density * numel)
    top = int(gamma * numel)
    bottom = numel - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(numel, dtype=torch.bool, device=delta.device)
    mask[order[bottom : numel - top]] = True
    return mask.view(delta.shape)


class Breadcrumbs(TensorMerge[BreadcrumbsParams]):
    elementwise = False

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        p = self.params_for(inputs)
        total = torch.zeros_like(inputs.base)
        for expert in inputs.experts:
            delta = expert - inputs.base
            total += delta * breadcrumbs_mask(delta, p.density, p.gamma)
        return torch.add(inputs.base, total, alpha=p.scaling_factor)


register(
    MethodSpec(
        name="breadcrumbs",
        summary="Task arithmetic after dropping each task vector's smallest values and largest outliers, per tensor.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=Breadcrumbs,
        params_model=BreadcrumbsParams,
        aliases=("model_breadcrumbs", "breadcrumbs_merging"),
        paper=Paper(
            "Model Breadcrumbs: scaling multi-task model merging with sparse masks (Davari & Belilovsky, 2024)",
            "https://arxiv.org/abs/2312.06795",
        ),
    )
)
