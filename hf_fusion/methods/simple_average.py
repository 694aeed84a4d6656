"""Simple averaging of the fine-tuned models (model soups, Wortsman et al. 2022)."""

from __future__ import annotations

from typing import Sequence

import torch

from hf_fusion.methods.base import TensorInputs, TensorMerge
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, NoParams, Paper, register


def simple_average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """theta = (1/n) sum_t theta_t over ``n`` same-shaped tensors."""
    total = tensors[0].clone() if len(tensors) == 1 else tensors[0] + tensors[1]
    for t in tensors[2:]:
        total.add_(t)
    return total.div_(len(tensors))


class SimpleAverage(TensorMerge[NoParams]):
    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        return simple_average(inputs.experts)


SPEC = register(
    MethodSpec(
        name="simple_average",
        summary="Element-wise mean of the models' weights (the base, if given, is not averaged in).",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.UNUSED,
        implementation=SimpleAverage,
        aliases=("average", "mean", "model_soup", "uniform_soup"),
        paper=Paper(
            "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
            "inference time (Wortsman et al., 2022)",
            "https://arxiv.org/abs/2203.05482",
        ),
    )
)
