"""Which layer a tensor belongs to, read from its name, and where that layer sits in the stack.

Transformer checkpoints number their blocks in the tensor names (``model.layers.3.mlp...``, ``encoder.layer.3...``,
``h.3...``, ``encoder.block.3...``): the first all-digit component after a known container is the layer index.
Tensors outside the stack (embeddings, final norm, heads) have none.

A layer's *position* runs from 0 for the first layer to 1 for the last, the variable a parameter gradient is
interpolated over. This is mergekit's rule, so its recipes give the same values here: within a run of ``n`` layers
the ``i``-th has position ``i / (n - 1)`` (1 for a run of one layer), and tensors outside the stack have position 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LAYER_CONTAINERS = ("layers", "layer", "h", "blocks", "block", "transformer_blocks", "single_transformer_blocks")
"""Module names whose numbered children are a model's layers (Llama, BERT, GPT-2, ViT/CLIP, T5, Flux)."""

_LAYER = re.compile(r"(?:^|\.)(" + "|".join(LAYER_CONTAINERS) + r")\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to, or None for tensors outside the layer stack."""
    match = _LAYER.search(name)
    return int(match.group(2)) if match else None


def layer_prefix(name: str) -> str | None:
    """Everything before the layer number (``model.layers.``), or None outside the stack."""
    match = _LAYER.search(name)
    return name[: match.start(2)] if match else None


def rename_layer(name: str, index: int) -> str:
    """``name`` with its layer number replaced by ``index``; names outside the stack are returned unchanged."""
    match = _LAYER.search(name)
    if match is None:
        return name
    return name[: match.start(2)] + str(index) + name[match.end(2) :]


def count_layers(names: Iterable[str]) -> int:
    """How many layers a checkpoint's names number (the highest index plus one; 0 without a layer stack)."""
    return max((i + 1 for n in names if (i := layer_index(n)) is not None), default=0)


def position(index: int, run_length: int) -> float:
    """The position of the ``index``-th layer of a run of ``run_length`` layers, in [0, 1]."""
    return index / (run_length - 1) if run_length > 1 else 1.0


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """Every name's position when the layers form one run (a merge without slices)."""
    names = list(names)
    total = count_layers(names)
    return {n: 0.0 if (i := layer_index(n)) is None else position(i, total) for n in names}
