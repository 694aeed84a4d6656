"""Simple averaging of the fine-tuned models (model soups, Wortsman et al. 2022)."""

from __future__ import annotations

import pydantic
import torch

from hf_fusion.engine.contract import Scan, TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN
from hf_fusion.methods.operations import simple_average
from hf_fusion.methods.scope_alignment import ALIGNMENT_FIELD, ScopeAligner
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class SimpleAverageParams(pydantic.BaseModel):
    model_config = FROZEN
    weight_scope_alignment: bool = ALIGNMENT_FIELD


class SimpleAverage(TensorMerge[SimpleAverageParams]):
    fixed_parameters = frozenset({"weight_scope_alignment"})

    def __init__(self, params: SimpleAverageParams, *, num_models: int, has_base: bool) -> None:
        super().__init__(params, num_models=num_models, has_base=has_base)
        self.aligner = ScopeAligner([1.0] * num_models) if params.weight_scope_alignment else None

    def task_vector_weights(self, params: SimpleAverageParams) -> list[float] | None:
        """The mean of models sharing a base is the base plus the mean task vector (scope alignment rescales them)."""
        return None if params.weight_scope_alignment else [1.0 / self.num_models] * self.num_models

    def prepare(self, scan: Scan) -> None:
        if self.aligner is not None:
            self.aligner.prepare(scan)

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        if self.aligner is not None:
            return simple_average(self.aligner.align(inputs))
        return simple_average(inputs.experts)


SPEC = register(
    MethodSpec(
        name="simple_average",
        summary="Element-wise mean of the models' weights (the base, if given, is not averaged in).",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.UNUSED,
        implementation=SimpleAverage,
        params_model=SimpleAverageParams,
        aliases=("average", "mean", "model_soup", "uniform_soup"),
        paper=Paper(
            "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
            "inference time (Wortsman et al., 2022)",
            "https://arxiv.org/abs/2203.05482",
        ),
    )
)
