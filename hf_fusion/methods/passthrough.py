"""Passthrough: layers copied as they are, mergekit's method for frankenmerges (layer ranges of models stacked).

With ``slices`` whose every slice has one source, the output is those layer ranges stacked in order (the plan
copies them; nothing is fused). Without slices it copies its one model, cast to the recipe's dtype.
"""

from __future__ import annotations

import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.errors import RecipeError
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, NoParams, Paper, register


class Passthrough(TensorMerge[NoParams]):
    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        if len(inputs.experts) != 1 or inputs.base is not None:
            raise RecipeError(f"passthrough copies one input, got {len(inputs.experts)} for {inputs.name!r}.")
        return inputs.experts[0]


SPEC = register(
    MethodSpec(
        name="passthrough",
        summary="Copies layers unchanged: stacks the layer ranges of one-source slices (frankenmerges), or copies "
        "one model in --dtype.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.UNUSED,
        implementation=Passthrough,
        aliases=("frankenmerge",),
        paper=Paper(
            "Arcee's MergeKit: a toolkit for merging large language models (Goddard et al., 2024)",
            "https://arxiv.org/abs/2403.13257",
        ),
    )
)
