"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al. 2023) on the plain task vectors.

The passes (model-wide magnitude thresholds, sign election, the fallback sign) are in
:mod:`hf_fusion.methods.ties_core`, shared with DARE-TIES.
"""

from __future__ import annotations

import torch

from hf_fusion.engine.contract import TensorInputs
from hf_fusion.methods.ties_core import TiesCore, TiesParams, check_ties_pool
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class TiesMerging(TiesCore):
    """TIES on the plain task vectors theta_t - theta_0."""

    def task_vectors(self, inputs: TensorInputs) -> torch.Tensor:
        """theta_t - theta_0 of every model, written into one new ``(n, ...)`` tensor without a temporary list."""
        assert inputs.base is not None
        out = torch.empty((len(inputs.experts), *inputs.base.shape), dtype=inputs.base.dtype, device=inputs.base.device)
        for i, expert in enumerate(inputs.experts):
            torch.sub(expert, inputs.base, out=out[i])
        return out


SPEC = register(
    MethodSpec(
        name="ties_merging",
        summary="Trim each task vector to its largest values, elect a sign per weight, merge the agreeing values.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=TiesMerging,
        params_model=TiesParams,
        aliases=("ties", "ties_merge"),
        check_pool=check_ties_pool,
        paper=Paper(
            "TIES-Merging: resolving interference when merging models (Yadav et al., 2023)",
            "https://arxiv.org/abs/2306.01708",
        ),
    )
)
