"""Output ensembles: every model runs and their outputs are averaged, weighted or maxed (no weights are merged)."""

from __future__ import annotations

import pydantic
from torch import nn

from hf_fusion.errors import ParameterError
from hf_fusion.methods.common import FROZEN
from hf_fusion.modelwise.base import ModelFusion, ModelwiseContext
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodKind, MethodSpec, NoParams, Paper, register


class _Ensemble(ModelFusion[pydantic.BaseModel]):
    aggregation = "mean"
    """How ``FusedEnsembleModel`` combines the outputs: mean, weighted or max."""

    def weights(self) -> list[float] | None:
        return None

    def fuse(self, context: ModelwiseContext) -> nn.Module:
        from hf_fusion.models.ensemble import FusedEnsembleModel

        members = [model for _, model in context.iter_experts()]
        return FusedEnsembleModel.from_members(members, weights=self.weights(), aggregation=self.aggregation)  # type: ignore[arg-type]


class SimpleEnsemble(_Ensemble):
    aggregation = "mean"


class MaxModelPredictor(_Ensemble):
    aggregation = "max"


class WeightedEnsembleParams(pydantic.BaseModel):
    model_config = FROZEN
    weights: list[float] | None = pydantic.Field(None, description="one weight per model (equal when omitted)")
    normalize: bool = pydantic.Field(True, description="divide the weights by their sum")


class WeightedEnsemble(_Ensemble):
    aggregation = "weighted"

    def weights(self) -> list[float]:
        raw = self.params.weights or [1.0] * self.num_models
        if self.params.normalize:
            total = sum(raw)
            return [w / total for w in raw]
        return list(raw)


def _check_weights(params: WeightedEnsembleParams, num_models: int, has_base: bool) -> None:
    if params.weights is not None and len(params.weights) != num_models:
        raise ParameterError(f"weighted_ensemble: {len(params.weights)} weights for {num_models} models.")
    if params.weights is not None and params.normalize and sum(params.weights) == 0:
        raise ParameterError("weighted_ensemble: the weights sum to 0 and cannot be normalised.")


ENSEMBLE_PAPER = Paper(
    "Deep model fusion: a survey (Li et al., 2023), section on ensembles", "https://arxiv.org/abs/2309.15698"
)

register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="simple_ensemble",
        summary="Runs every model and averages their outputs.",
        family=Family.ENSEMBLE,
        data=DataNeed.NONE,
        base=BaseUse.UNUSED,
        implementation=SimpleEnsemble,
        params_model=NoParams,
        aliases=("ensemble", "output_ensemble"),
        paper=ENSEMBLE_PAPER,
        min_models=1,
    )
)
register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="weighted_ensemble",
        summary="Runs every model and sums their outputs with fixed weights.",
        family=Family.ENSEMBLE,
        data=DataNeed.NONE,
        base=BaseUse.UNUSED,
        implementation=WeightedEnsemble,
        params_model=WeightedEnsembleParams,
        paper=ENSEMBLE_PAPER,
        check_pool=_check_weights,
    )
)
register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="max_model_predictor",
        summary="Runs every model and keeps the element-wise maximum of their outputs.",
        family=Family.ENSEMBLE,
        data=DataNeed.NONE,
        base=BaseUse.UNUSED,
        implementation=MaxModelPredictor,
        params_model=NoParams,
        aliases=("max_predictor",),
        paper=ENSEMBLE_PAPER,
    )
)
