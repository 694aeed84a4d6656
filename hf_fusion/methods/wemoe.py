"""WEMoE (Tang et al., 2024): the MLPs of every block become weight-ensembling mixtures (the pretrained MLP plus
task vectors mixed by a per-sample router), everything else is task arithmetic; the routers are trained by test-time
entropy minimisation. Sparse WEMoE (E-WEMoE) keeps only the largest task-vector entries of the MLPs."""

from __future__ import annotations

import re
from typing import Any

import pydantic
import torch
from torch import nn

from hf_fusion.errors import FusionError
from hf_fusion.modelwise.adaptation import adapt
from hf_fusion.modelwise.base import ModelFusion, ModelwiseContext, is_linear, layer_stack, linear_weight, seeded
from hf_fusion.modelwise.data import TrainingParams
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodKind, MethodSpec, Paper, register

MLP_PART = re.compile(r"(^|\.)(mlp|intermediate|feed_forward|ffn|DenseReluDense)(\.|$)|^output\.dense$")
"""Linears of a block's feed-forward part: ``mlp.*`` (CLIP, GPT-2, Llama), BERT's ``intermediate.dense`` and
``output.dense`` (not ``attention.output.dense``), T5's ``DenseReluDense.*``."""


def mlp_linears(block: nn.Module) -> list[tuple[str, bool]]:
    """(name, is_entry) of a block's feed-forward linears; entries read the block's hidden states (fc1, up, gate),
    the others read the entries' outputs (fc2, down)."""
    names = [n for n, m in block.named_modules() if is_linear(m) and MLP_PART.search(n)]
    if not names:
        return []
    widths = [linear_weight(block.get_submodule(n)).shape[1] for n in names]
    hidden = min(widths)
    return [(n, w == hidden) for n, w in zip(names, widths)]


class WEMoEParams(TrainingParams):
    lr: float = pydantic.Field(1e-4, gt=0, description="Adam learning rate")
    init_lambda: float = pydantic.Field(
        0.3, description="initial routing weight, and the task-arithmetic scaling of everything outside the MLPs"
    )
    router_hidden_layers: int = pydantic.Field(2, ge=0, le=2, description="hidden layers of each router")
    batch_reduce: bool = pydantic.Field(
        False, description="one routing weight per batch (FusionBench's shortcut) instead of per sample"
    )


class SparseWEMoEParams(WEMoEParams):
    tv_prune_ratio: float = pydantic.Field(
        0.9, ge=0, lt=1, description="fraction of each MLP task vector's entries (smallest magnitudes) set to zero"
    )


def prune_smallest(tensor: torch.Tensor, ratio: float) -> torch.Tensor:
    """``tensor`` with its ``ratio`` smallest-magnitude entries zeroed (ties broken by position)."""
    drop = int(ratio * tensor.numel())
    if drop == 0:
        return tensor
    flat = tensor.flatten().clone()
    order = torch.argsort(flat.abs(), stable=True)
    flat[order[:drop]] = 0
    return flat.view_as(tensor)


class WEMoE(ModelFusion[WEMoEParams]):
    """WEMoE, and with :class:`SparseWEMoEParams` its sparse variant."""

    def fuse(self, context: ModelwiseContext) -> nn.Module:
        p = self.params
        base = context.load_base()
        stack_name, stack = layer_stack(base)
        routed: list[dict[str, Any]] = []
        routers: dict[str, dict[str, Any]] = {}
        for index, block in enumerate(stack):
            group = f"{stack_name}.{index}"
            linears = mlp_linears(block)
            if not linears:
                continue
            hidden = min(linear_weight(block.get_submodule(n)).shape[1] for n, _ in linears)
            routers[group] = {
                "hidden_size": hidden,
                "num_experts": context.num_models,
                "hidden_layers": p.router_hidden_layers,
                "batch_reduce": p.batch_reduce,
            }
            for name, entry in linears:
                weight = linear_weight(block.get_submodule(name))
                routed.append(
                    {
                        "name": f"{group}.{name}",
                        "kind": "weight_ensembling",
                        "router": group,
                        "entry": entry,
                        "in_features": weight.shape[1],
                        "out_features": weight.shape[0],
                        "bias": block.get_submodule(name).bias is not None,
                        "num_experts": context.num_models,
                    }
                )
        if not routed:
            raise FusionError(f"{type(base).__name__} has no feed-forward linears that WEMoE knows how to route.")
        model = context.upscaled_model(routed, routers)
        self._fill(model, base, context, routed)
        generator = seeded(p.seed)
        for router in model.routers.values():
            router.init_weights(p.init_lambda, generator)
        model.to(context.device)
        trainable = [param for router in model.routers.values() for param in router.parameters()]
        adapt(context, model, trainable, p, desc="WEMoE routers")
        return model.cpu().eval()

    def _fill(self, model: Any, base: nn.Module, context: ModelwiseContext, routed: list[dict[str, Any]]) -> None:
        """Task arithmetic (scaling ``init_lambda``) outside the routed MLPs; inside, the pretrained weights and
        each expert's (pruned) task vectors."""
        base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        merged = {k: v.clone() for k, v in base_state.items()}
        routed_names = {spec["name"]: spec for spec in routed}
        modules = {name: model.backbone.get_submodule(name) for name in routed_names}
        prune_ratio = getattr(self.params, "tv_prune_ratio", 0.0)
        with torch.no_grad():
            for module_name, module in modules.items():
                base_linear = base.get_submodule(module_name)
                module.weight.copy_(linear_weight(base_linear))
                if module.bias is not None:
                    module.bias.copy_(base_linear.bias)
            for i, expert in context.iter_experts():
                state = expert.state_dict()
                for name, tensor in state.items():
                    if tensor.is_floating_point() and name in merged:
                        merged[name] += self.params.init_lambda * (tensor - base_state[name])
                for module_name, module in modules.items():
                    linear = expert.get_submodule(module_name)
                    tau = linear_weight(linear) - linear_weight(base.get_submodule(module_name))
                    module.task_weights[i].copy_(prune_smallest(tau, prune_ratio))
                    if module.task_biases is not None:
                        beta = linear.bias - base.get_submodule(module_name).bias
                        module.task_biases[i].copy_(prune_smallest(beta, prune_ratio))
            skip = tuple(f"{name}." for name in routed_names)
            model.backbone.load_state_dict({k: v for k, v in merged.items() if not k.startswith(skip)}, strict=False)


PAPER = Paper(
    "Merging multi-task models via weight-ensembling mixture of experts (Tang et al., 2024)",
    "https://arxiv.org/abs/2402.00433",
)
register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="weight_ensembling_moe",
        summary="MLPs become routed mixtures of task vectors (routers trained on "
        "unlabelled test inputs); the rest is task arithmetic.",
        family=Family.MIX,
        data=DataNeed.UNLABELLED,
        base=BaseUse.REQUIRED,
        implementation=WEMoE,
        params_model=WEMoEParams,
        paper=PAPER,
        aliases=("wemoe", "we_moe", "clip_weight_ensembling_moe"),
    )
)
register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="sparse_weight_ensembling_moe",
        summary="WEMoE with each MLP task vector pruned to its largest entries.",
        family=Family.MIX,
        data=DataNeed.UNLABELLED,
        base=BaseUse.REQUIRED,
        implementation=WEMoE,
        params_model=SparseWEMoEParams,
        aliases=("sparse_wemoe", "e_wemoe", "sparse_clip_weight_ensembling_moe"),
        paper=Paper(
            "Efficient and effective weight-ensembling mixture of experts for multi-task model merging "
            "(Shen et al., 2024)",
            "https://arxiv.org/abs/2410.21804",
        ),
    )
)
