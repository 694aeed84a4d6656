"""Mixture-of-experts from dense models (mergekit-moe's job, and FusionBench's Mixtral up-scaling): each
feed-forward block becomes a routed sparse MoE whose experts are the models' own blocks (or copies of one model's).

Llama, Mistral and Qwen2 models become a stock ``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM`` (see
:mod:`hf_fusion.methods.moe_layout`), written tensor by tensor: expert ``j`` at layer ``i`` is model ``j``'s
feed-forward tensors; attention, norms, embeddings and head are the base's when there is a base (mergekit-moe's
rule), else the models' mean. Other architectures become hf-fusion's ``FusedUpscaledModel`` (non-expert tensors
averaged), as before.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
import torch
from torch import nn

from hf_fusion.engine.checkpoint import Checkpoint
from hf_fusion.errors import FusionError, ParameterError, RecipeError
from hf_fusion.methods.common import FROZEN
from hf_fusion.methods.moe_layout import check_stock_inputs, plan_tensors, stock_config, stock_moe
from hf_fusion.methods.moe_router import embedding_rows, hidden_rows, load_tokenizer, random_rows
from hf_fusion.modelwise.base import ModelFusion, ModelwiseContext, layer_stack, linear_weight, seeded
from hf_fusion.modelwise.streamed import StreamedModel
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodKind, MethodSpec, Paper, register
from hf_fusion.tasks.weights import read_state

FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn", "layer.1.DenseReluDense")


def feed_forward(block: nn.Module) -> tuple[str, str | None]:
    """(module, exit linear or None): the block's feed-forward module, or for BERT-style blocks, whose MLP is split
    between ``intermediate`` and ``output.dense``, the first half and the linear that ends it."""
    for name in FEED_FORWARD_NAMES:
        try:
            block.get_submodule(name)
            return name, None
        except AttributeError:
            continue
    try:
        block.get_submodule("intermediate")
        block.get_submodule("output.dense")
        return "intermediate", "output.dense"
    except AttributeError:
        raise FusionError(f"{type(block).__name__} has no feed-forward block this method knows.") from None


class MixtralParams(pydantic.BaseModel):
    model_config = FROZEN
    num_experts: int = pydantic.Field(4, ge=1, description="experts per block when up-cycling one model")
    experts_per_token: int = pydantic.Field(2, ge=1, description="experts each token is routed to")
    seed: int = pydantic.Field(0, description="seed of the routers' random initialisation")
    router_init: Literal["random", "hidden", "cheap_embed"] = pydantic.Field(
        "random",
        description="router rows: seeded random, the base's hidden states for each expert's prompts at each layer, "
        "or their mean token embedding (hidden and cheap_embed: Llama, Mistral and Qwen2 experts, with a base)",
    )
    router_prompts: list[list[str]] | None = pydantic.Field(
        None, description="one list of prompts per expert, for router_init hidden or cheap_embed"
    )

    @pydantic.model_validator(mode="after")
    def _prompts_match_the_mode(self) -> MixtralParams:
        if self.router_init == "random":
            if self.router_prompts is not None:
                raise ValueError("router_prompts are read only by router_init hidden or cheap_embed, not random")
            return self
        prompts = self.router_prompts
        if not prompts:
            raise ValueError(f"router_init {self.router_init} needs router_prompts: one list of prompts per expert")
        empty = [i for i, p in enumerate(prompts) if not p or not all(t.strip() for t in p)]
        if empty:
            raise ValueError(f"expert {empty[0]} has no prompts (or an empty one) in router_prompts")
        if len(prompts) > 1 and all(p == prompts[0] for p in prompts):
            raise ValueError("every expert has the same router_prompts, so the router could not tell them apart")
        return self


def expert_count(params: MixtralParams, num_models: int) -> int:
    """``num_experts`` copies when up-cycling one model, else one expert per model."""
    return params.num_experts if num_models == 1 else num_models


def check_moe_pool(params: MixtralParams, num_models: int, has_base: bool) -> None:
    """What the recipe alone can refuse: top-k, the number of prompt lists, and prompts without a base."""
    count = expert_count(params, num_models)
    if params.experts_per_token > count:
        raise ParameterError(f"experts_per_token {params.experts_per_token} is more than the {count} experts.")
    if params.router_prompts is not None and len(params.router_prompts) != count:
        raise ParameterError(
            f"router_prompts has {len(params.router_prompts)} list(s) of prompts for {count} experts; "
            "give one list per expert, in the order of the models."
        )
    if params.router_init != "random" and not has_base:
        raise RecipeError(
            f"router_init {params.router_init} reads the base model's tokenizer and weights: pass --base "
            "(one of the experts, or the model they were fine-tuned from)."
        )


class MixtralUpscaling(ModelFusion[MixtralParams]):
    """Llama, Mistral and Qwen2 experts: a stock Mixtral or Qwen2-MoE written tensor by tensor, each expert a
    model's own feed-forward block, everything else the base's (else the models' mean). Other architectures: a
    routed MoE inside the base architecture (``FusedUpscaledModel``), one model up-cycled into copies of its
    blocks, or each model's own block with everything else averaged."""

    def check_configs(
        self, experts: list[tuple[str, dict[str, Any] | None]], base: tuple[str, dict[str, Any] | None] | None
    ) -> None:
        inputs = ([base] if base is not None and self.has_base else []) + experts
        config = next((c for _, c in inputs if c is not None), None)  # a LoRA adapter has no config of its own
        if stock_moe(config) is None:
            if self.params.router_init != "random":
                kind = (config or {}).get("model_type")
                raise ParameterError(
                    f"router_init {self.params.router_init} needs Llama, Mistral or Qwen2 experts, not {kind}; "
                    "use router_init random."
                )
            return
        check_stock_inputs([label for label, _ in inputs], [config for _, config in inputs])

    def fuse(self, context: ModelwiseContext) -> nn.Module | StreamedModel:
        layout = stock_moe(context.member_config)
        if layout is None:
            return self.routed_mixture(context)
        p = self.params
        count = expert_count(p, context.num_models)
        models = [m.checkpoint() for m in context.experts]
        experts = models * count if len(models) == 1 else models
        base = context.base.checkpoint() if self.has_base and context.base is not None else None
        config = context.member_config
        routers = self.routers(context, base, config["num_hidden_layers"], count, config["hidden_size"])
        plan = plan_tensors(layout, base or models[0], experts, routers, [base] if base else models)
        sources = tuple(models) + ((base,) if base else ())
        return StreamedModel(stock_config(layout, config, count, p.experts_per_token), plan, sources)

    def routers(
        self, context: ModelwiseContext, base: Checkpoint | None, num_layers: int, count: int, hidden: int
    ) -> torch.Tensor:
        """``(layers, experts, hidden)`` router rows by ``router_init`` (see :mod:`hf_fusion.methods.moe_router`)."""
        p = self.params
        if p.router_init == "random":
            return random_rows(num_layers, count, hidden, p.seed)
        assert base is not None and context.base is not None and p.router_prompts is not None
        tokenizer = load_tokenizer(context.base.folder)
        if p.router_init == "cheap_embed":
            names = [n for n in base.entries if n.endswith("embed_tokens.weight")]
            if not names:
                raise FusionError(f"{base.label} has no embed_tokens.weight for router_init cheap_embed.")
            embed = read_state(base, names[:1])[names[0]]
            return embedding_rows(embed, tokenizer, p.router_prompts, num_layers)
        return hidden_rows(context.load_base(), tokenizer, p.router_prompts)

    def routed_mixture(self, context: ModelwiseContext) -> nn.Module:
        """The hf-fusion architecture, for models without a stock MoE counterpart."""
        p = self.params
        experts = [m for _, m in context.iter_experts()]
        first = experts[0]
        count = expert_count(p, len(experts))
        stack_name, stack = layer_stack(first)
        routed = []
        for index, block in enumerate(stack):
            name, exit_name = feed_forward(block)
            prefix = f"{stack_name}.{index}."
            entry = block.get_submodule(name)
            hidden = next(
                linear_weight(m).shape[1] for m in entry.modules() if hasattr(m, "weight") and m.weight.dim() == 2
            )
            routed.append(
                {
                    "name": prefix + name,
                    "kind": "moe_mlp",
                    "exit": prefix + exit_name if exit_name else None,
                    "num_experts": count,
                    "top_k": p.experts_per_token,
                    "hidden_size": hidden,
                }
            )
        model = context.upscaled_model(routed)
        with torch.no_grad():
            states = [m.state_dict() for m in experts]
            average = {
                k: torch.stack([s[k].float() for s in states]).mean(0) if v.is_floating_point() else v
                for k, v in states[0].items()
            }
            inner = tuple(f"{spec['name']}." for spec in routed) + tuple(
                f"{spec['exit']}." for spec in routed if spec["exit"]
            )
            model.backbone.load_state_dict({k: v for k, v in average.items() if not k.startswith(inner)}, strict=False)
            generator = seeded(p.seed)
            for spec in routed:
                moe = model.backbone.get_submodule(spec["name"])
                moe.router.weight.normal_(0.0, 0.02, generator=generator)
                for e, expert in enumerate(moe.experts):
                    source = experts[0 if len(experts) == 1 else e]
                    block = source.get_submodule(spec["name"])
                    if spec["exit"]:
                        block = nn.Sequential(block, source.get_submodule(spec["exit"]))
                    expert.load_state_dict(block.state_dict())
        return model.eval()


register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="mixtral_upscaling",
        summary="Feed-forward blocks become a routed sparse MoE: copies of one model's "
        "block (up-cycling), or each model's own block (MoE merging); Llama, Mistral and Qwen2 "
        "models become a stock Mixtral or Qwen2-MoE.",
        family=Family.MIX,
        data=DataNeed.NONE,
        base=BaseUse.OPTIONAL,
        implementation=MixtralUpscaling,
        params_model=MixtralParams,
        check_pool=check_moe_pool,
        aliases=("moe", "mixtral_moe_upscaling", "mixtral_moe_merging", "moe_upscaling", "sparse_upcycling"),
        paper=Paper(
            "Sparse upcycling: training mixture-of-experts from dense checkpoints (Komatsuzaki et al., 2023)",
            "https://arxiv.org/abs/2212.05055",
        ),
    )
)
