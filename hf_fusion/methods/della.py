"""DELLA-Merging: drop task-vector values with probabilities ranked by magnitude (MagPrune), rescale the
survivors, elect signs and average the agreeing values (Deep et al. 2024).

Within each row of a tensor (a 1-D tensor is one row), the value of ascending magnitude rank ``r`` of ``m`` is kept
with probability ``p_r = density - epsilon + 2 epsilon (r - 1) / (m - 1)`` and, if kept, divided by ``p_r``; then,
as in TIES with the disjoint mean, only values agreeing with the elected sign are averaged:
``theta_0 + lambda * mean_agreeing``. The random keep decisions use the same keyed stream as DARE, so a recipe
is reproducible on any device and however the engine slices rows.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.errors import RecipeError
from hf_fusion.methods.common import FROZEN, scaling_factor_field
from hf_fusion.methods.operations import disjoint_merge, elected_sign, keyed_uniform
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class DellaParams(pydantic.BaseModel):
    model_config = FROZEN
    scaling_factor: float = scaling_factor_field(1.0)
    density: float = pydantic.Field(
        0.7,
        gt=0.0,
        le=1.0,
        description="mean share of each task vector kept",
        json_schema_extra={"ui_range": (0.05, 1.0)},
    )
    epsilon: float = pydantic.Field(
        0.1,
        ge=0.0,
        lt=0.5,
        description="keep probabilities spread from density-epsilon to density+epsilon",
        json_schema_extra={"ui_range": (0.0, 0.3)},
    )
    seed: int = pydantic.Field(0, ge=0, description="seed of the keep decisions")


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-value keep probability from its ascending magnitude rank within its row (last dimension grouping)."""
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 1 else delta.reshape(1, -1)
    width = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(width, device=rows.device).expand_as(order))
    spread = ranks.to(delta.dtype) / (width - 1) if width > 1 else torch.full_like(rows, 0.5)
    return (density - epsilon + 2 * epsilon * spread).view(delta.shape)


def magprune(delta: torch.Tensor, density: float, epsilon: float, draws: torch.Tensor) -> torch.Tensor:
    """MagPrune of one task vector: keep where ``draws < p``, divide the kept values by ``p``."""
    if density >= 1.0 and epsilon == 0.0:
        return delta
    p = keep_probabilities(delta, density, epsilon)
    return torch.where(draws < p, delta / p, torch.zeros((), dtype=delta.dtype, device=delta.device))


class Della(TensorMerge[DellaParams]):
    elementwise = False
    row_local = True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        p = self.params_for(inputs)
        pruned = []
        for index, expert in enumerate(inputs.experts):
            delta = expert - inputs.base
            draws = keyed_uniform(p.seed, f"{index}\x1f{inputs.name}", inputs.flat_offset, delta.numel())
            pruned.append(magprune(delta, p.density, p.epsilon, draws.to(delta.device).view(delta.shape)))
        stacked = torch.stack(pruned)
        merged = disjoint_merge(stacked, elected_sign(stacked), "mean")
        return torch.add(inputs.base, merged, alpha=p.scaling_factor)


def _check(params: Any, num_models: int, has_base: bool) -> None:
    if params.density < 1.0 and not (0.0 < params.density - params.epsilon and params.density + params.epsilon <= 1.0):
        raise RecipeError(
            f"della: density +/- epsilon must stay within (0, 1] (got density {params.density}, "
            f"epsilon {params.epsilon})."
        )


register(
    MethodSpec(
        name="della",
        summary="Drop task-vector values with magnitude-ranked probabilities, rescale, elect signs, average.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=Della,
        params_model=DellaParams,
        aliases=("della_merging", "magprune"),
        paper=Paper(
            "DELLA-Merging: reducing interference in model merging through magnitude-based sampling "
            "(Deep et al., 2024)",
            "https://arxiv.org/abs/2406.11617",
        ),
        check_pool=_check,
    )
)
