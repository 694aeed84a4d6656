"""SMILE upscaling (Tang et al., 2024): every linear layer becomes a sparse mixture of low-rank experts, the rank-k
SVD of each task's weight difference, routed by how much of the input lies in each task's top singular directions.
Data-free; layers no expert changed keep the pretrained weights."""

from __future__ import annotations

from typing import Any

import pydantic
import torch
from torch import nn

from hf_fusion.methods.common import FROZEN
from hf_fusion.modelwise.base import ModelFusion, ModelwiseContext, is_linear, linear_weight
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodKind, MethodSpec, Paper, register


class SmileParams(pydantic.BaseModel):
    model_config = FROZEN
    gate_k: int = pydantic.Field(1, gt=0, description="singular vectors per expert in the router")
    k: int = pydantic.Field(128, gt=0, description="rank of each expert")
    top_k: int = pydantic.Field(1, gt=0, description="experts used per token")


def smile_factors(delta: torch.Tensor, k: int, gate_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate rows (gate_k, in), U (out, k), S V^T (k, in)) of one task's weight difference."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(k, s.shape[0])
    return vh[:gate_k].float(), u[:, :k].float(), (s[:k, None] * vh[:k]).float()


class SmileUpscaling(ModelFusion[SmileParams]):
    def fuse(self, context: ModelwiseContext) -> nn.Module:
        p = self.params
        base = context.load_base()
        experts = [m for _, m in context.iter_experts()]
        names = [n for n, m in base.named_modules() if is_linear(m)]
        routed: list[dict[str, Any]] = []
        factors: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
        with torch.no_grad():
            for name in names:
                w0 = linear_weight(base.get_submodule(name))
                b0 = base.get_submodule(name).bias
                deltas = [linear_weight(e.get_submodule(name)) - w0 for e in experts]
                if all(not d.any() for d in deltas):
                    continue
                rank = min(p.k, *w0.shape)
                gate_k = min(p.gate_k, *w0.shape)
                factors[name] = []
                for e, d in zip(experts, deltas):
                    gate, u, svh = smile_factors(d, rank, gate_k)
                    bias = e.get_submodule(name).bias - b0 if b0 is not None else None
                    factors[name].append((gate, u, svh, bias))
                routed.append(
                    {
                        "name": name,
                        "kind": "smile",
                        "in_features": w0.shape[1],
                        "out_features": w0.shape[0],
                        "num_experts": len(experts),
                        "rank": rank,
                        "gate_k": gate_k,
                        "top_k": min(p.top_k, len(experts)),
                        "bias": b0 is not None,
                    }
                )
        model = context.upscaled_model(routed)
        with torch.no_grad():
            routed_names = tuple(f"{spec['name']}." for spec in routed)
            model.backbone.load_state_dict(
                {k: v for k, v in base.state_dict().items() if not k.startswith(routed_names)}, strict=False
            )
            for spec in routed:
                name = spec["name"]
                module = model.backbone.get_submodule(name)
                module.weight.copy_(linear_weight(base.get_submodule(name)))
                if module.bias is not None:
                    module.bias.copy_(base.get_submodule(name).bias)
                parts = factors[name]
                module.gate.copy_(torch.cat([g for g, _, _, _ in parts]))
                module.expert_u.copy_(torch.stack([u for _, u, _, _ in parts]))
                module.expert_svh.copy_(torch.stack([s for _, _, s, _ in parts]))
                if module.expert_bias is not None:
                    module.expert_bias.copy_(torch.stack([b for _, _, _, b in parts]))  # type: ignore[misc]
        return model.eval()


register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="smile_upscaling",
        summary="Linear layers become sparse mixtures of low-rank (SVD) task experts, routed "
        "by the input's projection on each task's subspace (data-free).",
        family=Family.MIX,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=SmileUpscaling,
        params_model=SmileParams,
        aliases=("smile",),
        paper=Paper(
            "SMILE: zero-shot sparse mixture of low-rank experts construction from pre-trained foundation "
            "models (Tang et al., 2024)",
            "https://arxiv.org/abs/2408.10174",
        ),
    )
)
