"""A stock model with some modules replaced by routed mixtures of experts (WEMoE, SMILE, Mixtral-style MoE).

The config names the wrapped architecture (the base's own config) and, per replaced module, what replaces it, so
``from_pretrained`` rebuilds the same structure before loading the weights. The model takes the same inputs and
returns the same outputs as the wrapped one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .members import build_member, plain_config


class FusedUpscaledConfig(PretrainedConfig):
    model_type = "hf_fusion_upscaled"

    def __init__(
        self,
        backbone_config: dict[str, Any] | None = None,
        routed_modules: list[dict[str, Any]] | None = None,
        routers: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.backbone_config = plain_config(backbone_config or {})
        self.routed_modules = list(routed_modules or [])
        self.routers = dict(routers or {})
        super().__init__(**kwargs)


def router_key(group: str) -> str:
    """A ModuleDict key for a router group (module paths contain dots, which ModuleDict keys may not)."""
    return group.replace(".", "__")


class WeightEnsemblingRouter(nn.Module):
    """WEMoE's router: an MLP over a layer's MLP input giving one merging weight per task vector, averaged over
    tokens (per sample, or over the batch with ``batch_reduce``). 0 hidden layers is AdaMerging's fixed weights."""

    def __init__(self, hidden_size: int, num_experts: int, hidden_layers: int = 2, batch_reduce: bool = False) -> None:
        super().__init__()
        self.hidden_layers = hidden_layers
        self.batch_reduce = batch_reduce
        if hidden_layers == 0:
            self.weight = nn.Parameter(torch.empty(num_experts))
        else:
            widths = [hidden_size] * hidden_layers + [num_experts]
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.current: torch.Tensor | None = None

    def init_weights(self, init_lambda: float, generator: torch.Generator | None = None) -> None:
        """Near-zero weights and ``init_lambda`` output bias: every task vector starts at ``init_lambda``."""
        with torch.no_grad():
            if self.hidden_layers == 0:
                self.weight.fill_(init_lambda)
                return
            for i, layer in enumerate(self.layers):
                layer.weight.normal_(0.0, 0.01, generator=generator)
                layer.bias.fill_(init_lambda if i == len(self.layers) - 1 else 0.0)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Merging weights for input ``x`` (batch, tokens, hidden) -> (batch, experts); stored for the layer's
        later linears."""
        if self.hidden_layers == 0:
            weights = self.weight.expand(x.shape[0], -1)
        else:
            h = x
            for i, layer in enumerate(self.layers):
                h = layer(h)
                if i < len(self.layers) - 1:
                    h = F.relu(h)
            weights = h.mean(dim=tuple(range(1, h.dim() - 1))) if h.dim() > 2 else h
        if self.batch_reduce:
            weights = weights.mean(dim=0, keepdim=True).expand(x.shape[0], -1)
        self.current = weights
        return weights


class WeightEnsemblingLinear(nn.Module):
    """``W0 x + b0 + sum_i w_i(x) (tau_i x + beta_i)``: the base linear plus routed task vectors, which equals the
    linear with weights ``W0 + sum_i w_i tau_i`` per sample, without materialising that matrix per sample."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, bias: bool, entry: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.entry = in_features, out_features, entry
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.task_weights = nn.Parameter(torch.empty(num_experts, out_features, in_features), requires_grad=False)
        self.task_biases = nn.Parameter(torch.empty(num_experts, out_features), requires_grad=False) if bias else None
        self._router: WeightEnsemblingRouter | None = None

    def attach(self, router: WeightEnsemblingRouter) -> None:
        object.__setattr__(self, "_router", router)  # shared, owned by the model, not a submodule of each linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self._router is not None
        weights = self._router.route(x) if self.entry or self._router.current is None else self._router.current
        out = F.linear(x, self.weight, self.bias)
        delta = torch.einsum("...i,eoi->...eo", x, self.task_weights)
        if self.task_biases is not None:
            delta = delta + self.task_biases
        shape = (weights.shape[0],) + (1,) * (x.dim() - 2) + (weights.shape[1], 1)
        return out + (delta * weights.view(shape).to(delta.dtype)).sum(dim=-2)


class SmileLinear(nn.Module):
    """SMILE's sparse mixture of low-rank experts: the pretrained linear plus the top-k experts, each the rank-k
    SVD of one task's weight difference, routed by the norm of the input's projection on each task's top right
    singular vectors."""

    def __init__(
        self, in_features: int, out_features: int, num_experts: int, rank: int, gate_k: int, top_k: int, bias: bool
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank, self.gate_k, self.top_k = num_experts, rank, gate_k, top_k
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.gate = nn.Parameter(torch.empty(num_experts * gate_k, in_features), requires_grad=False)
        self.expert_u = nn.Parameter(torch.empty(num_experts, out_features, rank), requires_grad=False)
        self.expert_svh = nn.Parameter(torch.empty(num_experts, rank, in_features), requires_grad=False)
        self.expert_bias = nn.Parameter(torch.empty(num_experts, out_features), requires_grad=False) if bias else None

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, experts) weights: zero outside each token's top-k, renormalised softmax inside."""
        if self.num_experts == 1:
            return torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        logits = F.linear(x, self.gate).view(x.shape[0], self.num_experts, self.gate_k).norm(dim=-1)
        probs = logits.softmax(dim=-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, chosen, top)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        out = F.linear(flat, self.weight, self.bias)
        weights = self.routing(flat)
        low = torch.einsum("ni,eki->nek", flat, self.expert_svh)
        expert_out = torch.einsum("nek,eok->neo", low, self.expert_u)
        if self.expert_bias is not None:
            expert_out = expert_out + self.expert_bias
        out = out + (expert_out * weights.unsqueeze(-1)).sum(dim=1)
        return out.reshape(*shape[:-1], self.out_features)


class RoutedMLP(nn.Module):
    """A Mixtral-style sparse MoE over copies of a feed-forward block: a linear router picks the top-k experts per
    token and mixes their outputs with renormalised softmax weights."""

    def __init__(self, expert: nn.Module, num_experts: int, top_k: int, hidden_size: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_experts))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        probs = self.router(flat).softmax(dim=-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        top = (top / top.sum(dim=-1, keepdim=True)).to(flat.dtype)
        out: torch.Tensor | None = None
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            part = expert(flat[token]) * top[token, slot, None]
            if out is None:
                out = torch.zeros(flat.shape[0], part.shape[-1], dtype=part.dtype, device=part.device)
            out.index_add_(0, token, part)
        assert out is not None
        return out.reshape(*shape[:-1], out.shape[-1])


def build_routed(spec: dict[str, Any], model: nn.Module) -> nn.Module:
    """The module that replaces ``spec['name']`` in ``model``, built empty from its spec."""
    kind = spec["kind"]
    if kind == "weight_ensembling":
        return WeightEnsemblingLinear(
            spec["in_features"], spec["out_features"], spec["num_experts"], spec["bias"], spec["entry"]
        )
    if kind == "smile":
        return SmileLinear(
            spec["in_features"],
            spec["out_features"],
            spec["num_experts"],
            spec["rank"],
            spec["gate_k"],
            spec["top_k"],
            spec["bias"],
        )
    if kind == "moe_mlp":
        block = model.get_submodule(spec["name"])
        if spec.get("exit"):
            block = nn.Sequential(block, model.get_submodule(spec["exit"]))
        return RoutedMLP(block, spec["num_experts"], spec["top_k"], spec["hidden_size"])
    raise ValueError(f"unknown routed module kind {kind!r}")


class FusedUpscaledModel(PreTrainedModel):
    """The base architecture with routed modules in place of some of its own (listed in the config)."""

    config_class = FusedUpscaledConfig
    base_model_prefix = "upscaled"

    def __init__(self, config: FusedUpscaledConfig) -> None:
        super().__init__(config)
        self.backbone = build_member(config.backbone_config)
        self.main_input_name = getattr(self.backbone, "main_input_name", "input_ids")
        self.routers = nn.ModuleDict(
            {router_key(group): WeightEnsemblingRouter(**args) for group, args in config.routers.items()}
        )
        for spec in config.routed_modules:
            module = build_routed(spec, self.backbone)
            if spec.get("exit"):
                self.backbone.set_submodule(spec["exit"], nn.Identity())
            if isinstance(module, WeightEnsemblingLinear):
                module.attach(self.routers[router_key(spec["router"])])
            self.backbone.set_submodule(spec["name"], module)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Every weight comes from the fused checkpoint (or from the method that built the model)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for router in self.routers.values():
            router.current = None
        return self.backbone(*args, **kwargs)
