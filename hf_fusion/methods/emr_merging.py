"""EMR-Merging: elect one unified task vector, then a mask and a rescaler per task (Huang et al., NeurIPS 2024).

``sigma = sgn(sum_t tau_t)`` (zero counts as negative, as in the authors' code), the unified vector keeps at each
weight the largest magnitude among the task values agreeing with ``sigma``; task t's mask selects where its own
value agrees, and its rescaler matches the mean absolute value: ``lambda_t = sum_p mean|tau_t[p]| /
sum_p mean|m_t[p] * tau_uni[p]|`` over the model's tensors ``p``. Every task gets its own model,
``theta_0 + lambda_t * m_t * tau_uni``, written to a subfolder so that each loads with ``from_pretrained``. The
rescalers come from one statistics pass; the merge streams slices.
"""

from __future__ import annotations

import math

import torch

from hf_fusion.engine.contract import Scan, TensorInputs, TensorMerge
from hf_fusion.methods.operations import stacked_task_vectors
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, NoParams, Paper, register


def elect(task_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unified task vector ``(...)``, per-task masks ``(n, ...)``) of stacked task vectors ``(n, ...)``."""
    sign = torch.where(task_vectors.sum(dim=0) > 0, 1.0, -1.0).to(task_vectors.dtype)
    masks = task_vectors * sign > 0
    magnitude = (task_vectors * masks).abs_().amax(dim=0)
    return magnitude * sign, masks


class EmrMerging(TensorMerge[NoParams]):
    outputs_per_model = True

    def __init__(self, params: NoParams, *, num_models: int, has_base: bool) -> None:
        super().__init__(params, num_models=num_models, has_base=has_base)
        self.rescalers: torch.Tensor = torch.ones(num_models, dtype=torch.float64)

    def prepare(self, scan: Scan) -> None:
        """Sums, over tensors, each task's mean |tau_t| and mean |m_t tau_uni|; their ratio is its rescaler."""
        before = torch.zeros(self.num_models, dtype=torch.float64)
        after = torch.zeros(self.num_models, dtype=torch.float64)

        def visit(inputs: TensorInputs) -> None:
            tvs = stacked_task_vectors(inputs)
            unified, masks = elect(tvs)
            numel = max(1, math.prod(inputs.full_shape))
            before.add_(tvs.abs().flatten(1).sum(dim=1).double().cpu() / numel)
            after.add_((masks * unified).abs_().flatten(1).sum(dim=1).double().cpu() / numel)

        scan(visit)
        # a task whose vector is zero has an empty mask: its model is the base whatever the rescaler
        self.rescalers = torch.where(after > 0, before / after.clamp(min=1e-300), torch.ones_like(before))

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        unified, masks = elect(stacked_task_vectors(inputs))
        scales = self.rescalers.to(device=unified.device, dtype=unified.dtype)
        shape = (-1,) + (1,) * unified.dim()
        return inputs.base + masks * unified * scales.view(shape)


register(
    MethodSpec(
        name="emr_merging",
        summary="One model per task: a unified task vector elected from all, with a per-task mask and rescaler.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=EmrMerging,
        aliases=("emr", "emr_merge"),
        paper=Paper(
            "EMR-Merging: tuning-free high-performance model merging (Huang et al., 2024)",
            "https://arxiv.org/abs/2405.17461",
        ),
    )
)
