"""The fusion path, walked once from top to bottom by every method and model family:
:mod:`~hf_fusion.fusion.validate` (the recipe, no I/O), :mod:`~hf_fusion.fusion.inputs` (resolve, check, fetch,
pin), :mod:`~hf_fusion.fusion.tensor_wise` or :mod:`~hf_fusion.fusion.model_wise` (by the method's declared kind),
:mod:`~hf_fusion.fusion.output_folder` (side files, recipe, card, atomic rename), then
:mod:`~hf_fusion.fusion.evaluate` and the push, orchestrated by :func:`~hf_fusion.fusion.merge.merge`."""

from hf_fusion.fusion.evaluate import evaluate_fused, fused_models
from hf_fusion.fusion.merge import merge, run_fusion
from hf_fusion.fusion.options import FusionOptions
from hf_fusion.fusion.result import MergeResult
from hf_fusion.fusion.validate import ValidatedRecipe, as_recipe, validate_recipe

__all__ = [
    "FusionOptions",
    "MergeResult",
    "ValidatedRecipe",
    "as_recipe",
    "evaluate_fused",
    "fused_models",
    "merge",
    "run_fusion",
    "validate_recipe",
]
