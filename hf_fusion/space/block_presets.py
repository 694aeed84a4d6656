"""Block-weight presets for Stable Diffusion UNets: a choice in the Diffusion tab that fills its per-layer box.

A UNet gradient runs over its blocks in block-merge order (see :mod:`hf_fusion.engine.blocks`): ``IN00 .. INxx``,
``M00``, ``OUTxx``, 25 blocks for SD 1.x/2.x and 19 for SDXL, so a list of exactly that many values gives each block
its own value. A preset is such a list, shaped between a low and a high value, and written as a ``{filter, value}``
condition on the UNet's tensors (``unet.``), so text encoders and the VAE keep the form's value. The down / mid / up
preset needs no block count: it sets one value on each of the three groups by filter. Every preset is plain YAML in
the per-layer box afterwards, for the visitor to read and edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hf_fusion.errors import RecipeError

UNET_FILTER = "unet."
"""Per-tensor filters see ``component.tensor`` names: this one matches every tensor of the ``unet`` component."""


@dataclass(frozen=True)
class UnetLayout:
    """A UNet family's blocks in block-merge order: ``inputs`` input blocks, one middle block, as many outputs."""

    family: str
    inputs: int

    @property
    def blocks(self) -> int:
        return 2 * self.inputs + 1

    @property
    def middle(self) -> int:
        return self.inputs

    def block_names(self) -> list[str]:
        outputs = [f"OUT{i:02d}" for i in range(self.inputs)]
        return [*(f"IN{i:02d}" for i in range(self.inputs)), "M00", *outputs]


SD1 = UnetLayout("SD 1.x / 2.x", 12)
SDXL = UnetLayout("SDXL", 9)
LAYOUTS = (SD1, SDXL)

Shape = Callable[[int, UnetLayout], float]
"""A block's place in a preset, from 0 (the low value) to 1 (the high value)."""

SHAPES: dict[str, Shape] = {
    "ramp up, IN00 low to the last OUT high": lambda i, u: i / (u.blocks - 1),
    "ramp down, IN00 high to the last OUT low": lambda i, u: 1 - i / (u.blocks - 1),
    "input blocks high, the rest low": lambda i, u: float(i < u.middle),
    "middle block high, the rest low": lambda i, u: float(i == u.middle),
    "output blocks high, the rest low": lambda i, u: float(i > u.middle),
    "V: both ends high, the middle low": lambda i, u: abs(i - u.middle) / u.middle,
    "Λ: the middle high, both ends low": lambda i, u: 1 - abs(i - u.middle) / u.middle,
}

DOWN_MID_UP = "any UNet: down blocks low, mid block halfway, up blocks high (filters)"


def _name(layout: UnetLayout, shape: str) -> str:
    return f"{layout.family} UNet, {layout.blocks} blocks: {shape}"


PRESETS: dict[str, tuple[UnetLayout, str] | None] = {
    **{_name(layout, shape): (layout, shape) for layout in LAYOUTS for shape in SHAPES},
    DOWN_MID_UP: None,
}
"""Every preset by the name the dropdown shows: a layout and a shape, or None for the down / mid / up filters."""


def _number(value: float) -> str:
    """A value as the box shows it: four decimals at most, no trailing zeros."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def block_values(layout: UnetLayout, shape: str, low: float, high: float) -> list[float]:
    """One value per block of ``layout``: the shape's place between ``low`` and ``high``, rounded to 4 decimals."""
    place = SHAPES[shape]
    return [round(low + place(i, layout) * (high - low), 4) for i in range(layout.blocks)]


def preset_yaml(preset: str, parameter: str, low: float, high: float, other: float | None) -> str:
    """The per-layer box text of ``preset`` for ``parameter``; ``other`` is the value of the tensors the preset does
    not cover (none: the method's default)."""
    if preset not in PRESETS:
        raise RecipeError(f"unknown block preset {preset!r}; choose one of the list.")
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise RecipeError(f"the preset's {name} value must be a number, got {value!r}.")
    chosen = PRESETS[preset]
    lines = []
    if chosen is None:
        lines += [
            "# down blocks, mid block, up blocks of the UNet, by filter",
            f"{parameter}:",
            f"  - {{filter: {UNET_FILTER}down_blocks, value: {_number(low)}}}",
            f"  - {{filter: {UNET_FILTER}mid_block, value: {_number((low + high) / 2)}}}",
            f"  - {{filter: {UNET_FILTER}up_blocks, value: {_number(high)}}}",
        ]
    else:
        layout, shape = chosen
        names = layout.block_names()
        values = ", ".join(_number(v) for v in block_values(layout, shape, low, high))
        lines += [
            f"# {layout.family} UNet: one value per block, {names[0]}..{names[layout.middle - 1]}, "
            f"{names[layout.middle]}, {names[layout.middle + 1]}..{names[-1]}",
            f"{parameter}:",
            f"  - {{filter: {UNET_FILTER}, value: [{values}]}}",
        ]
    if other is not None:
        lines.append(f"  - {{value: {_number(other)}}}  # every other tensor")
    return "\n".join(lines) + "\n"
