"""AdaMerging (Yang et al., 2024): task arithmetic whose coefficients (one per task, or one per task and parameter
tensor) are learned by minimising the prediction entropy on unlabelled test inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic
import torch
from torch import nn
from torch.func import functional_call

from hf_fusion.errors import ParameterError
from hf_fusion.modelwise.adaptation import adapt, describe
from hf_fusion.modelwise.base import ModelFusion, ModelwiseContext
from hf_fusion.modelwise.data import TrainingParams
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodKind, MethodSpec, Paper, register

WEIGHTS_FILE = "merging_weights.json"


class AdaMergingParams(TrainingParams):
    init_values: float = pydantic.Field(0.3, description="initial coefficient of every task vector")
    clamp_weights: bool = pydantic.Field(False, description="clamp the coefficients to [0, 1] when merging")
    tie_weights: bool = pydantic.Field(True, description="keep tied parameters tied in the merged forward pass")
    weights: str | None = pydantic.Field(None, description=f"a {WEIGHTS_FILE} to reuse instead of learning")


class MergedBackbone(nn.Module):
    """The base with ``theta_0 + sum_i lambda_i tau_i`` substituted into its parameters on every forward pass,
    so gradients reach the coefficients ``lambda`` (shape (tasks,) or (tasks, parameters))."""

    def __init__(
        self,
        base: nn.Module,
        task_vectors: dict[str, torch.Tensor],
        coefficients: torch.Tensor,
        *,
        clamp: bool,
        tie: bool,
    ) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.names = list(task_vectors)
        self.task_vectors = task_vectors
        self.coefficients = nn.Parameter(coefficients)
        self.clamp, self.tie = clamp, tie
        self.main_input_name = getattr(base, "main_input_name", "input_ids")

    def lambdas(self) -> torch.Tensor:
        return self.coefficients.clamp(0, 1) if self.clamp else self.coefficients

    def merged_parameters(self) -> dict[str, torch.Tensor]:
        lam = self.lambdas()
        base = dict(self.base.named_parameters())
        merged = {}
        for j, name in enumerate(self.names):
            column = lam if lam.dim() == 1 else lam[:, j]
            tau = self.task_vectors[name]
            merged[name] = base[name] + torch.tensordot(column.to(tau.dtype), tau, dims=1)
        return merged

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.base, self.merged_parameters(), args, kwargs, tie_weights=self.tie)


def task_vectors(context: ModelwiseContext, base: nn.Module, device: str) -> dict[str, torch.Tensor]:
    """(tasks, ...) task vectors of every base parameter, experts loaded one at a time."""
    base_state = dict(base.named_parameters())
    stacked = {
        name: torch.empty((context.num_models, *p.shape), dtype=p.dtype, device=device)
        for name, p in base_state.items()
    }
    for i, expert in context.iter_experts():
        for name, p in expert.named_parameters():
            stacked[name][i] = p.detach().to(device) - base_state[name].detach()
    return stacked


class AdaMerging(ModelFusion[AdaMergingParams]):
    layer_wise = False

    def fuse(self, context: ModelwiseContext) -> nn.Module:
        p = self.params
        base = context.load_base().to(context.device)
        vectors = task_vectors(context, base, context.device)
        shape = (context.num_models, len(vectors)) if self.layer_wise else (context.num_models,)
        coefficients = self._initial(shape, list(vectors))
        backbone = MergedBackbone(
            base, vectors, coefficients.to(context.device), clamp=p.clamp_weights, tie=p.tie_weights
        )
        losses: list[float] = []
        if p.weights is None:
            losses = adapt(context, backbone, [backbone.coefficients], p, desc="AdaMerging")
        with torch.no_grad():
            merged = backbone.merged_parameters()
            for name, param in base.named_parameters():
                param.copy_(merged[name])
        self.extra_files = {WEIGHTS_FILE: self._weights_json(backbone, list(vectors), losses)}
        return base.cpu()

    def _initial(self, shape: tuple[int, ...], names: list[str]) -> torch.Tensor:
        if self.params.weights is None:
            return torch.full(shape, self.params.init_values)
        try:
            data = json.loads(Path(self.params.weights).expanduser().read_text())
        except (OSError, ValueError) as err:
            raise ParameterError(f"cannot read AdaMerging weights {self.params.weights}: {err}") from None
        values = torch.tensor(data.get("coefficients"), dtype=torch.float32)
        if tuple(values.shape) != shape or (self.layer_wise and data.get("parameters") != names):
            raise ParameterError(
                f"the AdaMerging weights in {self.params.weights} have shape "
                f"{tuple(values.shape)}; this pool needs {shape} ({'layer' if self.layer_wise else 'task'}-wise)."
            )
        return values

    def _weights_json(self, backbone: MergedBackbone, names: list[str], losses: list[float]) -> str:
        data = {
            "granularity": "layer" if self.layer_wise else "task",
            "clamped": self.params.clamp_weights,
            "coefficients": backbone.lambdas().detach().cpu().tolist(),
            **describe(losses),
        }
        if self.layer_wise:
            data["parameters"] = names
        return json.dumps(data, indent=1) + "\n"


class LayerWiseAdaMerging(AdaMerging):
    layer_wise = True


def _check_weights_file(params: AdaMergingParams, num_models: int, has_base: bool) -> None:
    if params.weights is not None and not Path(params.weights).expanduser().is_file():
        raise ParameterError(f"AdaMerging weights file {params.weights} does not exist.")


PAPER = Paper(
    "AdaMerging: adaptive model merging for multi-task learning (Yang et al., 2024)", "https://arxiv.org/abs/2310.02575"
)
register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="task_wise_adamerging",
        summary="Task arithmetic with one coefficient per task, learned by test-time entropy minimisation.",
        family=Family.MERGE,
        data=DataNeed.UNLABELLED,
        base=BaseUse.REQUIRED,
        implementation=AdaMerging,
        params_model=AdaMergingParams,
        paper=PAPER,
        check_pool=_check_weights_file,
        aliases=("clip_task_wise_adamerging", "task_adamerging"),
    )
)
register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="layer_wise_adamerging",
        summary="Task arithmetic with one coefficient per task and parameter tensor, "
        "learned by test-time entropy minimisation.",
        family=Family.MERGE,
        data=DataNeed.UNLABELLED,
        base=BaseUse.REQUIRED,
        implementation=LayerWiseAdaMerging,
        params_model=AdaMergingParams,
        paper=PAPER,
        check_pool=_check_weights_file,
        aliases=("adamerging", "clip_layer_wise_adamerging", "layer_adamerging"),
    )
)
