"""The stock transformers MoE architectures that dense decoder models become, and the plan of their tensors.

Llama and Mistral models become ``MixtralForCausalLM``, Qwen2 models ``Qwen2MoeForCausalLM``. Tensor names are
those ``save_pretrained`` of the stock class writes (transformers 5 keeps each MoE's experts fused as 3-D
parameters in memory but saves them per expert, ``block_sparse_moe.experts.{j}.w1``), so the output loads with no
conversion warning and matches a stock save key for key. Qwen2-MoE's shared expert is written as zeros of width 1:
its output, ``sigmoid(g x) * down(...)`` with ``down = 0``, is exactly zero, so both outputs route like Mixtral
(the softmax over the top-k routers renormalised to sum 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_fusion.engine.checkpoint import Checkpoint
from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH
from hf_fusion.errors import IncompatibleModelsError
from hf_fusion.modelwise.streamed import PlannedTensor
from hf_fusion.tasks.weights import read_state

DENSE_MLP = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<layer>\d+)\.mlp\.(?P<proj>gate|up|down)_proj\.weight$")
PROJECTIONS = ("gate", "up", "down")
NOT_COPIED = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")
SHARED_EXPERT_WIDTH = 1


@dataclass(frozen=True)
class StockMoe:
    """One stock MoE architecture: its config class, what replaces the dense class names, and its tensor names."""

    model_type: str
    config_class: str
    dense_prefixes: tuple[str, ...]
    class_prefix: str
    block: str
    projections: dict[str, str]
    shared_expert: bool = False

    def expert(self, prefix: str, layer: int, index: int, proj: str) -> str:
        return f"{prefix}{layer}.{self.block}.experts.{index}.{self.projections[proj]}.weight"

    def router(self, prefix: str, layer: int) -> str:
        return f"{prefix}{layer}.{self.block}.gate.weight"

    def architectures(self, dense: list[str]) -> list[str]:
        """``LlamaForCausalLM`` -> ``MixtralForCausalLM``: the dense classes' MoE counterparts."""
        out = []
        for name in dense or ["ForCausalLM"]:
            stem = next((name[len(p) :] for p in self.dense_prefixes if name.startswith(p)), name)
            out.append(self.class_prefix + stem)
        return out


MIXTRAL = StockMoe(
    model_type="mixtral",
    config_class="MixtralConfig",
    dense_prefixes=("Llama", "Mistral"),
    class_prefix="Mixtral",
    block="block_sparse_moe",
    projections={"gate": "w1", "down": "w2", "up": "w3"},
)
QWEN2_MOE = StockMoe(
    model_type="qwen2_moe",
    config_class="Qwen2MoeConfig",
    dense_prefixes=("Qwen2",),
    class_prefix="Qwen2Moe",
    block="mlp",
    projections={"gate": "gate_proj", "down": "down_proj", "up": "up_proj"},
    shared_expert=True,
)
STOCK_MOE: dict[str, StockMoe] = {"llama": MIXTRAL, "mistral": MIXTRAL, "qwen2": QWEN2_MOE}
UNSUPPORTED_FLAGS = ("attention_bias", "mlp_bias")
"""Llama options the Mixtral class has no weights for."""


def stock_moe(config: dict[str, Any] | None) -> StockMoe | None:
    """The stock MoE architecture a model of this config becomes, or None when there is none."""
    return STOCK_MOE.get(str((config or {}).get("model_type")))


def check_stock_inputs(labels: Sequence[str], configs: Sequence[dict[str, Any] | None]) -> None:
    """Every input (base included) of one model type, and no option the MoE class cannot hold."""
    types = {str((c or {}).get("model_type")) for c in configs if c is not None}
    if len(types) > 1:
        named = ", ".join(f"{label} is {(c or {}).get('model_type')}" for label, c in zip(labels, configs))
        raise IncompatibleModelsError(f"a MoE's experts and base must share one architecture: {named}.")
    for label, config in zip(labels, configs):
        flags = [f for f in UNSUPPORTED_FLAGS if (config or {}).get(f)]
        if flags:
            raise IncompatibleModelsError(
                f"{label} sets {', '.join(flags)}; MixtralForCausalLM has no such biases, so it cannot be an expert."
            )


def stock_config(layout: StockMoe, dense: dict[str, Any], num_experts: int, top_k: int) -> Any:
    """The MoE's config: the dense config's fields the MoE class knows, plus the routing ones."""
    import transformers

    config_class = getattr(transformers, layout.config_class)
    known = set(config_class().to_dict())
    fields = {k: v for k, v in dense.items() if k in known and k not in NOT_COPIED}
    if layout is QWEN2_MOE:
        fields.update(
            num_experts=num_experts,
            moe_intermediate_size=dense["intermediate_size"],
            shared_expert_intermediate_size=SHARED_EXPERT_WIDTH,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    else:
        fields.update(num_local_experts=num_experts)
    config = config_class(**fields, num_experts_per_tok=top_k)
    config.architectures = layout.architectures(dense.get("architectures") or [])
    return config


def plan_tensors(
    layout: StockMoe,
    reference: Checkpoint,
    experts: Sequence[Checkpoint],
    routers: torch.Tensor,
    shared: Sequence[Checkpoint],
) -> list[PlannedTensor]:
    """The MoE's tensors in the reference's order: each dense feed-forward tensor becomes one tensor per expert
    (``experts[j]``'s own), each layer gains its router (row ``j`` of ``routers[layer]``), and every other tensor
    is the mean of ``shared`` (the base alone, when there is one)."""
    plan: list[PlannedTensor] = []
    layers: dict[int, set[str]] = {}
    for name, entry in reference.entries.items():
        match = DENSE_MLP.match(name)
        if match is None:
            if ".mlp." in name:
                raise IncompatibleModelsError(f"{reference.label}: {name!r} has no place in a {layout.model_type} MoE.")
            plan.append(PlannedTensor(name, entry.dtype, entry.shape, _mean_of(shared, name)))
            continue
        prefix, layer, proj = match["prefix"], int(match["layer"]), match["proj"]
        if layer not in layers:
            layers[layer] = set()
            plan += _router_tensors(layout, prefix, layer, routers, entry.dtype)
        layers[layer].add(proj)
        for j, source in enumerate(experts):
            plan.append(
                PlannedTensor(layout.expert(prefix, layer, j, proj), entry.dtype, entry.shape, _read(source, name))
            )
    incomplete = [i for i, found in layers.items() if len(found) != len(PROJECTIONS)]
    if not layers or incomplete or sorted(layers) != list(range(routers.shape[0])):
        raise IncompatibleModelsError(
            f"{reference.label}: expected gate, up and down projections in each of {routers.shape[0]} layers "
            f"(found layers {sorted(layers)})."
        )
    return plan


def _router_tensors(
    layout: StockMoe, prefix: str, layer: int, routers: torch.Tensor, dtype: str
) -> list[PlannedTensor]:
    """A layer's router and, for Qwen2-MoE, its shared expert and that expert's gate, all zeros."""
    rows = routers[layer]
    hidden = rows.shape[1]
    torch_dtype = SAFETENSORS_TO_TORCH[dtype]
    tensors = [PlannedTensor(layout.router(prefix, layer), dtype, tuple(rows.shape), lambda: rows.to(torch_dtype))]
    if layout.shared_expert:
        block = f"{prefix}{layer}.{layout.block}"
        width = SHARED_EXPERT_WIDTH
        for name, shape in (
            (f"{block}.shared_expert.gate_proj.weight", (width, hidden)),
            (f"{block}.shared_expert.up_proj.weight", (width, hidden)),
            (f"{block}.shared_expert.down_proj.weight", (hidden, width)),
            (f"{block}.shared_expert_gate.weight", (1, hidden)),
        ):
            tensors.append(PlannedTensor(name, dtype, shape, lambda shape=shape: torch.zeros(shape, dtype=torch_dtype)))
    return tensors


def _read(source: Checkpoint, name: str) -> Callable[[], torch.Tensor]:
    if name not in source.entries:
        raise IncompatibleModelsError(f"{source.label} has no tensor {name!r}, which the MoE's experts need.")
    return lambda: read_state(source, [name])[name]


def _mean_of(sources: Sequence[Checkpoint], name: str) -> Callable[[], torch.Tensor]:
    """The tensor itself (one source), or the sources' mean in float32 cast back to the first one's dtype."""
    readers = [_read(s, name) for s in sources]
    if len(readers) == 1:
        return readers[0]

    def mean() -> torch.Tensor:
        first = readers[0]()
        if not first.is_floating_point():
            return first
        total = first.float()
        for read in readers[1:]:
            total += read().float()
        return (total / len(readers)).to(first.dtype)

    return mean
