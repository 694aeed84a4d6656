"""Build the wrapped stock model of a fused architecture from its config dict (the base model's own config)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def member_class(config: dict[str, Any]) -> type[nn.Module]:
    """The transformers class named first in ``architectures`` (``BertModel``, ``LlamaForCausalLM``...), else the
    bare ``AutoModel`` class for the config's model type."""
    import transformers

    names = config.get("architectures") or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    cfg = transformers.AutoConfig.for_model(**config)
    return transformers.AutoModel._model_mapping[type(cfg)]


def build_member(config: dict[str, Any]) -> nn.Module:
    """An (uninitialised) stock model of ``config``'s architecture; its weights come from the fused checkpoint."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    return member_class(config)(cfg)


def plain_config(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a transformers config (or a dict), for nesting in a fused config."""
    data = config if isinstance(config, dict) else config.to_dict()
    return {
        k: v
        for k, v in data.items()
        if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")
    }


def combine_outputs(outputs: list[Any], weights: torch.Tensor | None, aggregation: str) -> Any:
    """Element-wise mean, weighted sum or maximum of model outputs (``ModelOutput``s, tuples or tensors)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        stacked = torch.stack(outputs)
        if aggregation == "max":
            return stacked.max(dim=0).values
        if weights is None:
            return stacked.mean(dim=0)
        return torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)
    if isinstance(first, dict):
        combined = type(first)(
            **{
                k: combine_outputs([o[k] for o in outputs], weights, aggregation)
                for k in first.keys()
                if first[k] is not None
            }
        )
        return combined
    if isinstance(first, (tuple, list)):
        return type(first)(combine_outputs([o[i] for o in outputs], weights, aggregation) for i in range(len(first)))
    return first
