"""WUDI-Merging: find, per weight matrix, the merged task vector whose interference with each task is smallest
(Cheng et al. 2025, "Whoever started the interference should end it").

For task matrices ``tau_i`` the loss is ``sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2``, minimised by Adam
from ``tau = sum_i tau_i`` (FusionBench: lr 1e-5, 400 iterations). Its gradient is ``2 (tau A - B)`` with
``A = sum_i tau_i^T tau_i / ||tau_i||^2`` and ``B = sum_i tau_i tau_i^T tau_i / ||tau_i||^2`` fixed, so each step
costs one matrix product instead of a forward and backward pass over every task; the iterates are those of the
autograd formulation. Tensors that are not matrices are averaged. Zero task vectors carry no interference and are
left out of the loss (their weight would be 0/0).
"""

from __future__ import annotations

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN, is_matrix
from hf_fusion.methods.operations import stacked_task_vectors
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register


class WudiParams(pydantic.BaseModel):
    model_config = FROZEN
    iter_num: int = pydantic.Field(400, ge=0, le=100_000, description="Adam steps per weight matrix")
    lr: float = pydantic.Field(1e-5, gt=0.0, le=1.0, description="Adam learning rate")


def interference_terms(task_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the loss gradient ``2 (tau A - B)`` for task matrices ``(n, out, in)``."""
    width = task_vectors.shape[2]
    a = task_vectors.new_zeros((width, width))
    b = torch.zeros_like(task_vectors[0])
    for tau in task_vectors:  # one (in, in) Gram matrix at a time
        sq_norm = float(tau.square().sum())
        if sq_norm == 0.0:
            continue
        gram = (tau.T @ tau).div_(sq_norm)
        a += gram
        b += tau @ gram
    return a, b


def wudi_merge(task_vectors: torch.Tensor, iter_num: int, lr: float) -> torch.Tensor:
    """The WUDI task vector of one matrix, ``(n, out, in) -> (out, in)``."""
    a, b = interference_terms(task_vectors)
    merged = torch.nn.Parameter(task_vectors.sum(dim=0))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0.0)
    for _ in range(iter_num):
        with torch.no_grad():
            merged.grad = 2.0 * (merged @ a - b)
        optimizer.step()
    return merged.detach()


class WudiMerging(TensorMerge[WudiParams]):
    elementwise = False

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        p = self.params_for(inputs)
        tvs = stacked_task_vectors(inputs)
        if not is_matrix(inputs):
            return inputs.base + tvs.mean(dim=0)
        return inputs.base + wudi_merge(tvs, p.iter_num, p.lr)


register(
    MethodSpec(
        name="wudi_merging",
        summary="Per matrix, optimise the merged task vector to minimise its interference with each task vector.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=WudiMerging,
        params_model=WudiParams,
        aliases=("wudi", "wudi_merge"),
        paper=Paper(
            "Whoever started the interference should end it: guiding data-free model merging via task vectors "
            "(Cheng et al., 2025)",
            "https://arxiv.org/abs/2503.08099",
        ),
    )
)
