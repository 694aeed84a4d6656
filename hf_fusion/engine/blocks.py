"""Block positions of diffusion backbones, so a gradient runs over UNet or Flux blocks the way block-weight
merges count them.

Block-weighted merges (SuperMerger's "MBW", sd-mecha's block recipes) give one value per block of the UNet in the
order ``IN00 .. INxx, M00, OUT00 .. OUTxx``: the input convolution and time embedding are ``IN00``; each ResNet (with
its attention) of a down block is one input block, its downsampler the next; the mid block is ``M00``; each ResNet
of an up block is one output block, the upsampler belonging to the last; the output norm and convolution are the
last output block. That is 25 blocks for SD 1.x/2.x (12 + 1 + 12) and 19 for SDXL (9 + 1 + 9). A Flux (or SD3-like)
transformer counts its double-stream blocks, then its single-stream ones (19 + 38 for Flux); embedders sit with the
first block and the output layers with the last.

A tensor's position is its block's index over ``blocks - 1``, so a gradient of exactly ``blocks`` values gives every
block its own value, and shorter gradients interpolate (mergekit's rule, as for LLM layers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from hf_fusion.engine.layers import layer_positions, position

_DOWN = re.compile(r"^down_blocks\.(\d+)\.(?:(resnets|attentions)\.(\d+)|(downsamplers))\.")
_UP = re.compile(r"^up_blocks\.(\d+)\.(?:(resnets|attentions)\.(\d+)|(upsamplers))\.")
_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.")
_UNET_OUTPUT = ("conv_norm_out.", "conv_out.")
_TRANSFORMER_OUTPUT = ("norm_out.", "proj_out.")


def is_unet(names: Iterable[str]) -> bool:
    names = list(names)
    return any(n.startswith("down_blocks.") for n in names) and any(n.startswith("mid_block.") for n in names)


def is_block_transformer(names: Iterable[str]) -> bool:
    return any(_DOUBLE.match(n) or _SINGLE.match(n) for n in names)


def unet_blocks(names: Iterable[str]) -> dict[str, int]:
    """Each UNet tensor's block index in ``IN00 .. M00 .. OUTxx`` order (see the module docstring)."""
    names = list(names)
    per_down = 1 + max((int(m.group(3)) for n in names if (m := _DOWN.match(n)) and m.group(3)), default=0)
    per_up = 1 + max((int(m.group(3)) for n in names if (m := _UP.match(n)) and m.group(3)), default=0)
    downs = 1 + max((int(m.group(1)) for n in names if (m := _DOWN.match(n))), default=0)
    inputs = 1 + downs * (per_down + 1) - 1  # IN00, then each down block's layers and downsampler (none on the last)
    ups = 1 + max((int(m.group(1)) for n in names if (m := _UP.match(n))), default=0)
    outputs = ups * per_up
    blocks = {}
    for name in names:
        if (m := _DOWN.match(name)) is not None:
            i = int(m.group(1))
            j = per_down if m.group(4) else int(m.group(3))
            blocks[name] = 1 + i * (per_down + 1) + j
        elif name.startswith("mid_block."):
            blocks[name] = inputs
        elif (m := _UP.match(name)) is not None:
            i = int(m.group(1))
            j = per_up - 1 if m.group(4) else int(m.group(3))
            blocks[name] = inputs + 1 + i * per_up + j
        elif name.startswith(_UNET_OUTPUT):
            blocks[name] = inputs + outputs
        else:  # conv_in, time and added-condition embeddings
            blocks[name] = 0
    return blocks


def transformer_blocks(names: Iterable[str]) -> dict[str, int]:
    """Each tensor's block index in a Flux-like transformer: double-stream blocks, then single-stream ones."""
    names = list(names)
    doubles = 1 + max((int(m.group(1)) for n in names if (m := _DOUBLE.match(n))), default=-1)
    singles = 1 + max((int(m.group(1)) for n in names if (m := _SINGLE.match(n))), default=-1)
    blocks = {}
    for name in names:
        if (m := _DOUBLE.match(name)) is not None:
            blocks[name] = int(m.group(1))
        elif (m := _SINGLE.match(name)) is not None:
            blocks[name] = doubles + int(m.group(1))
        elif name.startswith(_TRANSFORMER_OUTPUT):
            blocks[name] = max(doubles + singles - 1, 0)
        else:
            blocks[name] = 0
    return blocks


def diffusion_blocks(names: Iterable[str]) -> dict[str, int] | None:
    """Block indices when ``names`` are a UNet's or a block transformer's; None for other components."""
    names = list(names)
    if is_unet(names):
        return unet_blocks(names)
    if is_block_transformer(names):
        return transformer_blocks(names)
    return None


def component_positions(names: Iterable[str]) -> dict[str, float]:
    """Every tensor's gradient position: over blocks for a UNet or block transformer, else over layers."""
    names = list(names)
    blocks = diffusion_blocks(names)
    if blocks is None:
        return layer_positions(names)
    count = max(blocks.values(), default=0) + 1
    return {n: position(b, count) for n, b in blocks.items()}
