"""Architecture-changing methods without data: depth up-scaling (SOLAR) by repeating layers, and model
recombination of whole blocks across models (MoE up-scaling lives in ``mixtral_upscaling.py``)."""

from __future__ import annotations

import copy
import random
from typing import Any

import pydantic
import torch
from torch import nn

from hf_fusion.errors import ParameterError
from hf_fusion.methods.common import FROZEN
from hf_fusion.modelwise.base import ModelFusion, ModelwiseContext, layer_stack
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodKind, MethodSpec, Paper, register
from hf_fusion.tasks.weights import DEPTH_UPSCALED_KEY

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def parse_indices(values: list[Any] | None, num_layers: int) -> list[int]:
    """Layer indices from ints and ``"start:stop"`` ranges (Python slices), checked against the model's depth."""
    if values is None:
        return list(range(num_layers))
    indices: list[int] = []
    for v in values:
        if isinstance(v, str) and ":" in v:
            start, stop = (int(x) if x.strip() else None for x in v.split(":", 1))
            indices += list(range(num_layers))[start:stop]
        else:
            indices.append(int(v))
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad or not indices:
        raise ParameterError(f"layer_indices must name layers 0..{num_layers - 1}; got {values}.")
    return indices


class DepthParams(pydantic.BaseModel):
    model_config = FROZEN
    layer_indices: list[int | str] | None = pydantic.Field(
        None, description='base layers to stack, in order; ints or "start:stop" ranges, e.g. ["0:24", "8:32"]'
    )


class DepthUpscaling(ModelFusion[DepthParams]):
    """A deeper stock model whose layers are copies of the given layers of one model (SOLAR's depth up-scaling)."""

    def fuse(self, context: ModelwiseContext) -> nn.Module:
        model = context.load_expert(0)
        stack_name, stack = layer_stack(model)
        indices = parse_indices(self.params.layer_indices, len(stack))
        layers = nn.ModuleList(copy.deepcopy(stack[i]) for i in indices)
        for new_index, layer in enumerate(layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index
        model.set_submodule(stack_name, layers)
        for key in LAYER_COUNT_KEYS:
            if hasattr(model.config, key) and isinstance(getattr(model.config, key), int):
                setattr(model.config, key, len(indices))
        if getattr(model.config, "layer_types", None) is not None:
            model.config.layer_types = [model.config.layer_types[i] for i in indices]
        setattr(model.config, DEPTH_UPSCALED_KEY, indices)
        return model


class RecombinationParams(pydantic.BaseModel):
    model_config = FROZEN
    seed: int = pydantic.Field(0, description="seed of the random recombination")


class ModelRecombination(ModelFusion[RecombinationParams]):
    """A new model of the same architecture whose every block, and every module outside the blocks, is taken
    whole from a randomly chosen input model (the first of FusionBench's recombined pool)."""

    def fuse(self, context: ModelwiseContext) -> nn.Module:
        rng = random.Random(self.params.seed)
        experts = [m for _, m in context.iter_experts()]
        model = experts[0]
        stack_name, stack = layer_stack(model)
        stacks = [layer_stack(m)[1] for m in experts]
        for index in range(len(stack)):
            stack[index] = stacks[rng.randrange(len(experts))][index]
        with torch.no_grad():
            for name, module in list(model.named_modules()):
                if name.startswith(stack_name) or stack_name.startswith(name) or list(module.children()):
                    continue
                source = experts[rng.randrange(len(experts))].get_submodule(name)
                module.load_state_dict(source.state_dict())
        return model


register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="depth_upscaling",
        summary="A deeper model stacking copies of chosen layers of one model (SOLAR).",
        family=Family.MIX,
        data=DataNeed.NONE,
        base=BaseUse.UNUSED,
        implementation=DepthUpscaling,
        params_model=DepthParams,
        max_models=1,
        paper=Paper(
            "SOLAR 10.7B: scaling large language models with simple yet effective depth up-scaling (Kim et al., 2023)",
            "https://arxiv.org/abs/2312.15166",
        ),
    )
)
register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="model_recombination",
        summary="A model assembled from whole blocks and modules of randomly chosen input models.",
        family=Family.MIX,
        data=DataNeed.NONE,
        base=BaseUse.UNUSED,
        implementation=ModelRecombination,
        params_model=RecombinationParams,
        min_models=2,
        paper=Paper(
            "Learning from models beyond fine-tuning (Zheng et al., 2023), model recombination",
            "https://arxiv.org/abs/2310.12808",
        ),
    )
)
