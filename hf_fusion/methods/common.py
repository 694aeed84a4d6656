"""Parameter fields, pool checks and input accessors shared by several methods, declared once so they never drift."""

from __future__ import annotations

from typing import Any

import pydantic

from hf_fusion.errors import RecipeError

FROZEN = pydantic.ConfigDict(extra="forbid", frozen=True)

LINEAR_MODULES = frozenset({"Linear", "Conv1D", "NonDynamicallyQuantizableLinear"})
"""Module types whose ``weight`` is a linear map (transformers' Conv1D is GPT-2's transposed Linear)."""


def scaling_factor_field(default: float) -> Any:
    return pydantic.Field(
        default,
        ge=-10.0,
        le=10.0,
        description="lambda: how much of the (combined) task vector is added to the base",
        json_schema_extra={"ui_range": (0.0, 1.5)},
    )


def model_weights_field() -> Any:
    return pydantic.Field(
        None,
        description="one weight per model multiplying its task vector (mergekit's `weight`); null gives each 1",
    )


def per_model_field(what: str) -> Any:
    return pydantic.Field(None, description=f"one {what} per model, in recipe order, instead of the single value")


def per_model(values: list[float] | None, default: float, num_models: int) -> list[float]:
    """A per-model parameter's values, or ``default`` for every model when it is not given."""
    return list(values) if values is not None else [default] * num_models


def check_per_model(method: str, params: Any, names: tuple[str, ...], num_models: int) -> None:
    """Per-model parameters must give exactly one value per model."""
    for name in names:
        values = getattr(params, name, None)
        if values is not None and len(values) != num_models:
            raise RecipeError(
                f"{method}: `{name}` has {len(values)} value(s) for {num_models} model(s); give one per model."
            )


def interpolation_field() -> Any:
    return pydantic.Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="t: 0 returns the first model, 1 the second",
        json_schema_extra={"ui_range": (0.0, 1.0)},
    )


def check_two_models(params: Any, num_models: int, has_base: bool) -> None:
    """Two-model methods take either a base and one model, or two models and no base."""
    expected = 1 if has_base else 2
    if num_models != expected:
        raise RecipeError(
            "this method interpolates exactly two models: give a base and one model, or two models without a base "
            f"(got {num_models} model(s){' and a base' if has_base else ''})."
        )


def two_model_endpoints(inputs: Any) -> tuple[Any, Any]:
    """(start, end) of a two-model method: the base and the model, or the first and second model."""
    if inputs.base is not None:
        return inputs.base, inputs.experts[0]
    return inputs.experts[0], inputs.experts[1]


def is_matrix(inputs: Any) -> bool:
    """Whether the SVD-based methods treat this tensor as a linear map (2-D); others fall back to averaging."""
    return len(inputs.full_shape) == 2
