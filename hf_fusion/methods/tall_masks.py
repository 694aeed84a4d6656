"""TALL masks and consensus merging: locate, per task, the weights where the multi-task vector serves that task
(Wang et al., ICML 2024, "Localizing task information for improved model merging and compression").

The TALL mask of task t keeps the weights where its task vector outweighs the rest of the multi-task vector:
``m_t = |tau_t| > lambda |tau_MTL - tau_t|`` with ``tau_MTL = sum_t tau_t``. ``tall_masks`` rebuilds one model per
task, ``theta_0 + m_t * tau_MTL`` (the compression use); ``consensus_merging`` keeps one model, dropping the
weights that fewer than ``k`` tasks need: ``theta_0 + lambda_TA * [sum_t m_t >= k] * tau_MTL``.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.errors import RecipeError
from hf_fusion.methods.common import FROZEN, scaling_factor_field
from hf_fusion.methods.operations import stacked_task_vectors
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register

PAPER = Paper(
    "Localizing task information for improved model merging and compression (Wang et al., 2024)",
    "https://arxiv.org/abs/2405.07813",
)


def _lambda_field(default: float) -> Any:
    return pydantic.Field(
        default,
        ge=0.0,
        le=100.0,
        description="lambda: a weight belongs to a task when |tau_t| > lambda |tau_MTL - tau_t|",
        json_schema_extra={"ui_range": (0.0, 1.0)},
    )


def tall_masks(task_vectors: torch.Tensor, multi_task: torch.Tensor, tall_mask_lambda: float) -> torch.Tensor:
    """Boolean masks ``(n, ...)``: where each task's vector outweighs the rest of the multi-task vector."""
    return task_vectors.abs() > (multi_task - task_vectors).abs().mul_(tall_mask_lambda)


class TallMasksParams(pydantic.BaseModel):
    model_config = FROZEN
    tall_mask_lambda: float = _lambda_field(0.6)


class ConsensusParams(pydantic.BaseModel):
    model_config = FROZEN
    scaling_factor: float = scaling_factor_field(0.3)
    tall_mask_lambda: float = _lambda_field(0.6)
    k: int = pydantic.Field(2, ge=1, description="keep the weights that at least k tasks' masks select")


class TallMaskModels(TensorMerge[TallMasksParams]):
    outputs_per_model = True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        tvs = stacked_task_vectors(inputs)
        multi_task = tvs.sum(dim=0)
        masks = tall_masks(tvs, multi_task, self.params_for(inputs).tall_mask_lambda)
        return inputs.base + masks * multi_task


class ConsensusMerging(TensorMerge[ConsensusParams]):
    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        tvs = stacked_task_vectors(inputs)
        multi_task = tvs.sum(dim=0)
        p = self.params_for(inputs)
        votes = tall_masks(tvs, multi_task, p.tall_mask_lambda).sum(dim=0)
        return torch.add(inputs.base, multi_task * (votes >= p.k), alpha=p.scaling_factor)


def _check_k(params: Any, num_models: int, has_base: bool) -> None:
    if params.k > num_models:
        raise RecipeError(
            f"consensus_merging with k={params.k} needs at least {params.k} models, got {num_models}: "
            "no weight could reach the consensus."
        )


register(
    MethodSpec(
        name="tall_masks",
        summary="One model per task: base + the multi-task vector masked to the weights that task relies on.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=TallMaskModels,
        params_model=TallMasksParams,
        aliases=("tall_mask", "tall_mask_task_arithmetic", "tall_masks_task_arithmetic"),
        paper=PAPER,
    )
)
register(
    MethodSpec(
        name="consensus_merging",
        summary="Task arithmetic restricted to the weights that at least k tasks' TALL masks select.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=ConsensusMerging,
        params_model=ConsensusParams,
        aliases=("consensus", "consensus_task_arithmetic", "consensus_ta"),
        paper=PAPER,
        check_pool=_check_k,
    )
)
