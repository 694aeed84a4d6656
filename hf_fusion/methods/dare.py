"""DARE (drop and rescale) on top of simple averaging, task arithmetic and TIES (Yu et al. 2024).

Each task vector element is dropped with probability ``sparsity_ratio`` and the survivors are divided by
``1 - sparsity_ratio`` (the paper, FusionBench). mergekit instead rescales each tensor to keep its L1 norm;
``rescale="l1"`` selects that. The drop mask is a pure function of ``seed``, the model's position and the tensor
name (see :func:`hf_fusion.methods.operations.keyed_uniform`), so a recipe is reproducible on any device.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.methods.common import (
    FROZEN,
    LINEAR_MODULES,
    check_per_model,
    model_weights_field,
    per_model,
    per_model_field,
    scaling_factor_field,
)
from hf_fusion.methods.operations import Rescale, random_drop
from hf_fusion.methods.ties_core import TiesCore, TiesParams, check_ties_pool
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register

DARE_PAPER = Paper(
    "Language models are Super Mario: absorbing abilities from homologous models as a free lunch (DARE, Yu et al., "
    "2024)",
    "https://arxiv.org/abs/2311.03099",
)


class DareOptions(pydantic.BaseModel):
    model_config = FROZEN
    sparsity_ratio: float = pydantic.Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="p: probability of dropping each task-vector element",
        json_schema_extra={"ui_range": (0.0, 0.99)},
    )
    rescale: Rescale = pydantic.Field(
        "inverse",
        description="inverse: divide survivors by 1-p (paper); l1: keep each tensor's L1 norm (mergekit); none",
    )
    sparsity_ratios: list[float] | None = per_model_field("sparsity ratio")
    seed: int = pydantic.Field(0, ge=0, description="seed of the drop masks")
    only_on_linear_weights: bool = pydantic.Field(
        False, description="drop only in the weights of linear layers (others keep their full task vector)"
    )

    @pydantic.field_validator("rescale", mode="before")
    @classmethod
    def _rescale_from_bool(cls, value: Any) -> Any:
        """FusionBench spells the paper's rescaling ``rescale: true``."""
        if value is True:
            return "inverse"
        if value is False:
            return "none"
        return value

    @pydantic.field_validator("sparsity_ratios")
    @classmethod
    def _ratios_in_range(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(0.0 <= r < 1.0 for r in value):
            raise ValueError(f"each sparsity ratio must be in [0, 1) (got {value})")
        return value


class DareTaskArithmeticParams(DareOptions):
    scaling_factor: float = scaling_factor_field(0.3)
    weights: list[float] | None = model_weights_field()
    normalize: bool = pydantic.Field(False, description="divide the weighted sum by the sum of the weights")


class DareTiesParams(TiesParams, DareOptions):
    scaling_factor: float = scaling_factor_field(0.5)


def dropped_task_vectors(inputs: TensorInputs, options: DareOptions) -> list[torch.Tensor]:
    """DARE applied to each model's task vector of one tensor (slice)."""
    assert inputs.base is not None
    if options.only_on_linear_weights and not (inputs.module_type in LINEAR_MODULES and inputs.name.endswith("weight")):
        return [expert - inputs.base for expert in inputs.experts]
    ratios = per_model(options.sparsity_ratios, options.sparsity_ratio, len(inputs.experts))
    return [
        random_drop(
            expert - inputs.base,
            ratios[index],
            seed=options.seed,
            stream=f"{index}\x1f{inputs.name}",
            flat_offset=inputs.flat_offset,
            rescale=options.rescale,
        )
        for index, expert in enumerate(inputs.experts)
    ]


class DareTaskArithmetic(TensorMerge[DareTaskArithmeticParams]):
    """theta = theta_0 + lambda sum_t DARE(theta_t - theta_0)."""

    fixed_parameters = frozenset({"rescale", "only_on_linear_weights"})
    """They decide whether the engine may slice tensors and must look up module types."""

    def __init__(self, params: Any, *, num_models: int, has_base: bool) -> None:
        super().__init__(params, num_models=num_models, has_base=has_base)
        self.elementwise = params.rescale != "l1"
        self.needs_module_types = params.only_on_linear_weights

    def scale(self, params: Any) -> float:
        return params.scaling_factor

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        params = self.params_for(inputs)
        deltas = dropped_task_vectors(inputs, params)
        weights = per_model(getattr(params, "weights", None), 1.0, len(deltas))
        total = deltas[0].mul_(weights[0]) if weights[0] != 1.0 else deltas[0]
        for d, w in zip(deltas[1:], weights[1:]):
            total = total.add_(d, alpha=w)
        scale = self.scale(params)
        if getattr(params, "normalize", False):
            total_weight = sum(weights)
            scale /= total_weight if abs(total_weight) >= 1e-8 else 1.0
        return torch.add(inputs.base, total, alpha=scale)


class DareSimpleAverage(DareTaskArithmetic):
    """theta = theta_0 + (1/n) sum_t DARE(theta_t - theta_0), FusionBench's DARE on simple averaging."""

    def scale(self, params: Any) -> float:
        return 1.0 / self.num_models


class DareTiesMerging(TiesCore):
    """TIES on DARE-dropped task vectors (FusionBench's dare/ties_merging; mergekit's dare_ties)."""

    @classmethod
    def fixed_for(cls, params: Any) -> frozenset[str]:
        return super().fixed_for(params) | {"rescale", "only_on_linear_weights"}

    def __init__(self, params: Any, *, num_models: int, has_base: bool) -> None:
        super().__init__(params, num_models=num_models, has_base=has_base)
        self.elementwise = params.rescale != "l1"
        self.needs_module_types = params.only_on_linear_weights

    def task_vectors(self, inputs: TensorInputs) -> torch.Tensor:
        """The DARE-dropped task vectors, stacked: TIES then trims and merges what survived the drop."""
        return torch.stack(dropped_task_vectors(inputs, self.params_for(inputs)))


def _check_dare(params: Any, num_models: int, has_base: bool) -> None:
    check_per_model("DARE", params, ("sparsity_ratios", "weights"), num_models)


register(
    MethodSpec(
        name="dare_simple_average",
        summary="Drop and rescale each task vector, then average: base + mean of DARE task vectors.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=DareSimpleAverage,
        params_model=DareOptions,
        aliases=("dare_average", "dare_mean"),
        check_pool=_check_dare,
        paper=DARE_PAPER,
    )
)
register(
    MethodSpec(
        name="dare_task_arithmetic",
        summary="Drop and rescale each task vector, then task arithmetic.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=DareTaskArithmetic,
        params_model=DareTaskArithmeticParams,
        aliases=("dare_linear", "dare_ta", "dare"),
        check_pool=_check_dare,
        paper=DARE_PAPER,
    )
)
register(
    MethodSpec(
        name="dare_ties_merging",
        summary="Drop and rescale each task vector, then TIES-merge them.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=DareTiesMerging,
        params_model=DareTiesParams,
        aliases=("dare_ties",),
        check_pool=check_ties_pool,
        paper=DARE_PAPER,
    )
)
