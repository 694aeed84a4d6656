"""Initial router rows of a MoE built from dense experts, one ``(experts, hidden)`` matrix per layer.

``random``: seeded N(0, 0.02^2). ``hidden``: each expert's row at layer ``i`` is the base model's residual stream
entering layer ``i`` (``hidden_states[i]`` of ``output_hidden_states``) at the last token of each of that expert's
prompts, averaged over the prompts and scaled to unit length, so a token whose hidden state points the way of an
expert's prompts is routed there (mergekit-moe's ``hidden`` gate mode). ``cheap_embed``: the mean input embedding
of all the expert's prompt tokens, scaled to unit length, the same row at every layer (no forward pass). Each
prompt is tokenized without special tokens and starts with the tokenizer's BOS token when it has one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from hf_fusion.errors import FusionError

log = logging.getLogger(__name__)

RANDOM_STD = 0.02


def random_rows(num_layers: int, num_experts: int, hidden: int, seed: int) -> torch.Tensor:
    """``(layers, experts, hidden)`` seeded normal rows."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num_layers, num_experts, hidden), generator=generator) * RANDOM_STD


def load_tokenizer(folder: Path) -> Any:
    """The base model's tokenizer, which turns each expert's prompts into ids."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise FusionError(
            f"router prompts need the base model's tokenizer, and {folder} has none that loads ({err}); "
            "use a base with tokenizer files, or router_init random."
        ) from None


def prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """``(1, tokens)`` ids of one prompt: BOS (when the tokenizer has one), then the prompt's own tokens."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise FusionError(f"the base's tokenizer turns router prompt {prompt!r} into no tokens; check the prompt.")
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor([ids])


def unit(rows: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit L2 norm (a zero row stays zero)."""
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)


@torch.no_grad()
def hidden_rows(model: torch.nn.Module, tokenizer: Any, prompts: list[list[str]]) -> torch.Tensor:
    """``(layers, experts, hidden)`` rows from the base ``model``'s hidden states (see the module docstring)."""
    rows = []
    for expert_prompts in prompts:
        states = []
        for prompt in expert_prompts:
            out = model(input_ids=prompt_ids(tokenizer, prompt), output_hidden_states=True, use_cache=False)
            states.append(torch.stack([h[0, -1].float() for h in out.hidden_states[:-1]]))
        rows.append(unit(torch.stack(states).mean(0)))
    result = torch.stack(rows, dim=1)
    warn_similar(result)
    return result


def embedding_rows(embed: torch.Tensor, tokenizer: Any, prompts: list[list[str]], num_layers: int) -> torch.Tensor:
    """``(layers, experts, hidden)`` rows from the mean input embedding of each expert's prompt tokens."""
    rows = []
    for expert_prompts in prompts:
        ids = torch.cat([prompt_ids(tokenizer, p)[0] for p in expert_prompts])
        if int(ids.max()) >= embed.shape[0]:
            raise FusionError(f"the tokenizer gives id {int(ids.max())}, past the {embed.shape[0]} embedding rows.")
        rows.append(unit(embed[ids].float().mean(0)))
    result = torch.stack(rows).unsqueeze(0).expand(num_layers, -1, -1).contiguous()
    warn_similar(result)
    return result


def warn_similar(rows: torch.Tensor, threshold: float = 0.999) -> None:
    """Logs the layers where two experts' rows point the same way: the router cannot tell them apart there."""
    cosine = unit(rows) @ unit(rows).transpose(1, 2)
    cosine = cosine - torch.eye(rows.shape[1]) * 2
    layers = [i for i in range(rows.shape[0]) if float(cosine[i].max()) > threshold]
    if layers:
        log.warning(
            "router rows of two experts are nearly parallel at layer(s) %s: their prompts look alike to the base "
            "model, so the router will hardly tell those experts apart.",
            ", ".join(map(str, layers)),
        )
