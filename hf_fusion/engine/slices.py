"""An output whose layers are runs of input layers (mergekit's ``slices``), built as checkpoint views.

Each input the plan reads is seen as a checkpoint whose layer ``k`` is some input's layer ``j``, renamed; reads go to
the tensor it stands for. The plan and the engine then work unchanged: a run with several sources fuses, layer by
layer, the layers each input gives; a run with one source gives every view the same tensors, which the plan copies
from that source (``copy_from``) instead of fusing. Output layers are numbered ``0..N-1`` in run order.

Tensors outside the layer stack: when some run fuses, every input keeps its own and they are fused as without
slices. When every run copies, there is no fusion to share them out, so (like mergekit) those before the stack
(embeddings, see :func:`before_stack`) come from the first run's input and the others (final norm, output head,
pooler) from the last run's input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_fusion.engine.checkpoint import Checkpoint
from hf_fusion.engine.layers import layer_index, layer_positions, layer_prefix, position, rename_layer
from hf_fusion.errors import IncompatibleModelsError
from hf_fusion.recipe import OutputSlice

EMBEDDING_MODULES = ("wte", "wpe")
"""Module names of embeddings that do not say ``embed`` (GPT-2's token and position tables)."""


@dataclass(frozen=True)
class LayerRun:
    """``length`` consecutive output layers; ``starts`` pairs a checkpoint position with the first of its layers the
    run takes. One pair: the layers are copied from that input; several: they are fused."""

    starts: tuple[tuple[int, int], ...]
    length: int

    @property
    def copies(self) -> bool:
        return len(self.starts) == 1


@dataclass(frozen=True)
class SlicedInputs:
    """The views the plan reads (same positions as the checkpoints) and the output names copied from one view."""

    views: list[Checkpoint]
    copy_from: dict[str, int]


class SlicedCheckpoint(Checkpoint):
    """Tensors of other checkpoints under new names; reading one reads the tensor it stands for."""

    def __init__(self, label: str, picks: dict[str, tuple[Checkpoint, str]], weight_files: list[Path]) -> None:
        entries = {out: dataclasses.replace(ckpt.entries[name], name=out) for out, (ckpt, name) in picks.items()}
        super().__init__(label, entries, weight_files)
        self._picks = picks

    def read_rows(self, name: str, row_start: int, row_stop: int, out: torch.Tensor) -> None:
        ckpt, source = self._picks[name]
        ckpt.read_rows(source, row_start, row_stop, out)


def before_stack(name: str) -> bool:
    """Whether a tensor outside the layer stack comes before it: embeddings (a module named ``*embed*``, ``wte``
    or ``wpe``). Everything else outside the stack (final norm, output head, pooler) comes after it."""
    return any("embed" in part or part in EMBEDDING_MODULES for part in name.split(".")[:-1])


def check_one_stack(ckpt: Checkpoint) -> None:
    """Slices number one stack of layers; a model with several (encoder and decoder, vision and text towers) is
    refused rather than sliced in every stack at once."""
    prefixes = sorted({p for n in ckpt.entries if (p := layer_prefix(n)) is not None})
    if len(prefixes) > 1:
        raise IncompatibleModelsError(
            f"{ckpt.label} has several stacks of layers ({', '.join(p.rstrip('.') for p in prefixes)}); slices take "
            "layers from models with one stack (decoder-only language models, single encoders)."
        )
    if not prefixes:
        raise IncompatibleModelsError(f"{ckpt.label} has no numbered layers in its tensor names to take slices of.")


def _by_layer(ckpt: Checkpoint) -> dict[int | None, list[str]]:
    layers: dict[int | None, list[str]] = {}
    for name in ckpt.entries:
        layers.setdefault(layer_index(name), []).append(name)
    return layers


def slice_checkpoints(checkpoints: Sequence[Checkpoint], runs: Sequence[LayerRun], read: Sequence[int]) -> SlicedInputs:
    """Views of the checkpoints at positions ``read`` (those the plan reads) whose layers follow ``runs``; other
    positions (a LoRA adapter's base) are returned as they are."""
    for index in {p for run in runs for p, _ in run.starts} | set(read):
        check_one_stack(checkpoints[index])
    layers = {p: _by_layer(checkpoints[p]) for p in read}
    picks: dict[int, dict[str, tuple[Checkpoint, str]]] = {p: {} for p in read}
    copy_from: dict[str, int] = {}

    def take(position: int, names: Iterable[str], rename: int | None) -> None:
        """Every view takes ``names`` of ``position`` (a copy), renamed to output layer ``rename``."""
        for name in names:
            out = name if rename is None else rename_layer(name, rename)
            copy_from[out] = position
            for view in picks.values():
                view[out] = (checkpoints[position], name)

    copies_only = all(run.copies for run in runs)
    outside = {p: layers[p].get(None, []) for p in read}
    if copies_only:
        take(runs[0].starts[0][0], [n for n in outside[runs[0].starts[0][0]] if before_stack(n)], None)
    else:
        for p in read:
            picks[p].update({n: (checkpoints[p], n) for n in outside[p] if before_stack(n)})
    out_layer = 0
    for run in runs:
        for offset in range(run.length):
            if run.copies:
                source, start = run.starts[0]
                take(source, layers[source].get(start + offset, []), out_layer)
            else:
                for p, start in run.starts:
                    names = layers[p].get(start + offset, [])
                    picks[p].update({rename_layer(n, out_layer): (checkpoints[p], n) for n in names})
            out_layer += 1
    if copies_only:
        take(runs[-1].starts[0][0], [n for n in outside[runs[-1].starts[0][0]] if not before_stack(n)], None)
    else:
        for p in read:
            picks[p].update({n: (checkpoints[p], n) for n in outside[p] if not before_stack(n)})
    views = list(checkpoints)
    for p in read:
        views[p] = SlicedCheckpoint(checkpoints[p].label, picks[p], checkpoints[p].weight_files)
    return SlicedInputs(views, copy_from)


def slice_positions(names: Iterable[str], lengths: Sequence[int]) -> dict[str, float]:
    """Every output name's gradient position when the output's layers are runs of ``lengths`` layers: the ``i``-th
    layer of a run of ``n`` has position ``i / (n - 1)`` (1 for a run of one), tensors outside the stack 0."""
    owners = [(i, n) for n in lengths for i in range(n)]
    positions: dict[str, float] = {}
    for name in names:
        index = layer_index(name)
        if index is not None and index >= len(owners):
            raise ValueError(f"tensor {name!r} is in layer {index}, beyond the {len(owners)} layers of the slices")
        positions[name] = 0.0 if index is None else position(*owners[index])
    return positions


def output_positions(names: Iterable[str], slices: Sequence[OutputSlice] | None) -> dict[str, float]:
    """Gradient positions of a recipe's output tensors: per slice when it has ``slices``, else over the one stack."""
    if not slices:
        return layer_positions(names)
    return slice_positions(names, [s.num_layers for s in slices])
