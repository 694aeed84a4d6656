"""Model Stock: move from the base toward the models' average by a ratio set by the angle between their task
vectors (Jang et al. 2024).

Per tensor, ``t = k cos(theta) / ((k - 1) cos(theta) + 1)`` with ``theta`` the angle between task vectors (the mean
of the pairwise angles for more than two models, as in FusionBench) and the result is
``t * mean(models) + (1 - t) * base``. The angles come from one statistics pass of dot products, so the merge
itself streams slices like any element-wise method.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch

from hf_fusion.engine.contract import Scan, TensorInputs, TensorMerge
from hf_fusion.methods.operations import simple_average
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, NoParams, Paper, register

EPS = 1e-8


def stock_ratio(angle_degrees: float, num_models: int) -> float:
    """The interpolation ratio of the paper's eq. (for ``k`` models at mutual angle ``theta``)."""
    cos = math.cos(math.radians(angle_degrees))
    return num_models * cos / ((num_models - 1) * cos + 1 + EPS)


def pair_angle(dot: float, sq_norm_a: float, sq_norm_b: float) -> float:
    """Angle in degrees between two task vectors from their dot product and squared norms (0 norm: 90 degrees)."""
    cos = dot / (math.sqrt(sq_norm_a * sq_norm_b) + EPS)
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


class ModelStock(TensorMerge[NoParams]):
    def __init__(self, params: NoParams, *, num_models: int, has_base: bool) -> None:
        super().__init__(params, num_models=num_models, has_base=has_base)
        self._gram: dict[str, torch.Tensor] = {}
        self._ratio: dict[str, float] = {}

    def prepare(self, scan: Scan) -> None:
        """Accumulates, per tensor, the Gram matrix of the task vectors (float64) and turns it into a ratio."""

        def visit(inputs: TensorInputs) -> None:
            assert inputs.base is not None
            flat = torch.stack([(e - inputs.base).reshape(-1) for e in inputs.experts]).double()
            gram = flat @ flat.T
            previous = self._gram.get(inputs.name)
            self._gram[inputs.name] = gram if previous is None else previous + gram.to(previous.device)

        scan(visit)
        for name, gram in self._gram.items():
            g = gram.cpu()
            pairs = list(combinations(range(self.num_models), 2))
            angle = sum(pair_angle(float(g[i, j]), float(g[i, i]), float(g[j, j])) for i, j in pairs) / len(pairs)
            self._ratio[name] = stock_ratio(angle, self.num_models)
        self._gram.clear()

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        t = self._ratio[inputs.name]
        return torch.add(simple_average(inputs.experts).mul_(t), inputs.base, alpha=1.0 - t)


register(
    MethodSpec(
        name="model_stock",
        summary="Interpolate between the base and the models' average by a ratio from the angle of their task vectors.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=ModelStock,
        aliases=("modelstock", "model_stock_merging"),
        paper=Paper(
            "Model Stock: all we need is just a few fine-tuned models (Jang et al., 2024)",
            "https://arxiv.org/abs/2403.19522",
        ),
        min_models=2,
    )
)
