"""Fisher merging (Matena & Raffel, 2022): a per-parameter weighted average, each model weighted by its diagonal
Fisher information on its own task's data.

Under several processes each process computes the Fisher sums of its share of every expert's calibration batches;
the sums and the example counts are added over the processes before the mean is taken, so the merged model is one
process's up to float rounding."""

from __future__ import annotations

import pydantic
import torch
from torch import nn

from hf_fusion.errors import FusionError
from hf_fusion.modelwise.base import ModelFusion, ModelwiseContext
from hf_fusion.modelwise.data import CalibrationParams, calibration_batches
from hf_fusion.progress import progress_bar
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodKind, MethodSpec, Paper, register
from hf_fusion.runtime import Runtime

MAX_CLASSES = 1000
"""Most classes a task's logits may have: the exact Fisher sums one backward pass per class."""


class FisherParams(CalibrationParams):
    normalize_fisher_weight: bool = pydantic.Field(
        True, description="scale each model's Fisher by the inverse of its global L2 norm"
    )
    minimal_fisher_weight: float = pydantic.Field(1e-6, ge=0, description="added to every Fisher value")


def fisher_sums(network: nn.Module, backbone: nn.Module, logits_of, batches) -> tuple[dict[str, torch.Tensor], int]:
    """The sums over the examples of ``batches`` of ``sum_y p(y|x) (d log p(y|x) / d theta)^2`` for ``backbone``'s
    parameters, and the number of examples: divided by the count, the expected diagonal Fisher under the model's own
    predictive distribution, one example at a time (no labels are read)."""
    params = {name: p for name, p in backbone.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    for inputs in batches:
        size = next(iter(inputs.values())).shape[0]
        for row in range(size):
            example = {k: v[row : row + 1] for k, v in inputs.items()}
            log_probs = logits_of(network, example).float().log_softmax(dim=-1)[0]
            if log_probs.shape[0] > MAX_CLASSES:
                raise FusionError(
                    f"Fisher merging takes one backward pass per class, and this task's logits have "
                    f"{log_probs.shape[0]} (a vocabulary: a regression target, or target words that "
                    f"share a first token); it supports up to {MAX_CLASSES}."
                )
            probs = log_probs.detach().exp()
            for y in range(log_probs.shape[0]):
                grads = torch.autograd.grad(
                    log_probs[y], list(params.values()), retain_graph=y + 1 < log_probs.shape[0], allow_unused=True
                )
                for (name, _), g in zip(params.items(), grads):
                    if g is not None:
                        fisher[name].add_(g.detach().square(), alpha=float(probs[y]))
            count += 1
    return fisher, count


def reduced_mean(sums: dict[str, torch.Tensor], count: int, runtime: Runtime) -> dict[str, torch.Tensor]:
    """The mean over every process's examples: ``sums`` and ``count`` added over the processes, then divided."""
    total = int(runtime.sum_(torch.tensor([count], dtype=torch.float64)).item())
    for f in sums.values():
        runtime.sum_(f)
    return {name: f / max(total, 1) for name, f in sums.items()}


def accumulate(
    numerator: dict[str, torch.Tensor],
    denominator: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    fisher: dict[str, torch.Tensor],
    *,
    normalize: bool,
    minimal: float,
) -> None:
    """Adds one model to the running ``sum_i c_i (F_i + m) theta_i`` and ``sum_i c_i (F_i + m)``, with
    ``c_i = 1 / (||F_i|| + m)`` when ``normalize`` (the normalisation over models cancels in the ratio), else 1."""
    scale = 1.0
    if normalize:
        norm = torch.sqrt(
            sum((f.double().square().sum() for f in fisher.values()), torch.zeros((), dtype=torch.float64))
        )
        scale = 1.0 / (float(norm) + minimal)
    for name, theta in state.items():
        weight = (fisher[name] + minimal) * scale
        if name in numerator:
            numerator[name].add_(weight * theta)
            denominator[name].add_(weight)
        else:
            numerator[name] = weight * theta
            denominator[name] = weight.clone()


class FisherMerging(ModelFusion[FisherParams]):
    def fuse(self, context: ModelwiseContext) -> nn.Module:
        p = self.params
        numerator: dict[str, torch.Tensor] = {}
        denominator: dict[str, torch.Tensor] = {}
        model: nn.Module | None = None
        with progress_bar(
            total=context.num_models, desc="Fisher information", unit="model", disable=not context.show_progress
        ) as bar:
            for i, model in context.iter_experts():
                evaluator = context.evaluator(i, calibration=True, limit=p.calibration_samples, batch_size=p.batch_size)
                network = evaluator.task_network(model)
                batches = calibration_batches(evaluator, context.runtime)
                fisher = reduced_mean(*fisher_sums(network, model, evaluator.logits, batches), context.runtime)
                state = {name: t.detach().cpu() for name, t in model.named_parameters()}
                accumulate(
                    numerator,
                    denominator,
                    state,
                    {k: v.cpu() for k, v in fisher.items()},
                    normalize=p.normalize_fisher_weight,
                    minimal=p.minimal_fisher_weight,
                )
                bar.update(1)
        assert model is not None
        model = model.cpu()
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(numerator[name] / denominator[name])
                param.requires_grad_(False)
        return model


register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="fisher_merging",
        summary="Parameter-wise average weighted by each model's diagonal Fisher on its task.",
        family=Family.MERGE,
        data=DataNeed.UNLABELLED,
        base=BaseUse.UNUSED,
        implementation=FisherMerging,
        params_model=FisherParams,
        aliases=("fisher", "clip_fisher_merging", "gpt2_fisher_merging"),
        paper=Paper(
            "Merging models with Fisher-weighted averaging (Matena & Raffel, 2022)", "https://arxiv.org/abs/2111.09832"
        ),
        min_models=1,
    )
)
