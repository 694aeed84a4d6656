"""A labelled picture grid: one column per model (titled with its label), one row per prompt x seed.

The same cell of every column comes from the same prompt and seed, so a reader compares models along a row. The
layout is computed apart from the drawing, so the cells can be found again in the saved PNG (the JSON records it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
PADDING = 4
PROMPT_CHARS = 40
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass(frozen=True)
class GridLayout:
    """Where things are: a header band of ``header_height`` on top, a label band of ``label_width`` on the left,
    then ``columns`` x ``rows`` cells of ``cell_width`` x ``cell_height`` pixels."""

    columns: int
    rows: int
    cell_width: int
    cell_height: int
    label_width: int
    header_height: int

    @property
    def size(self) -> tuple[int, int]:
        return (
            self.label_width + self.columns * self.cell_width,
            self.header_height + self.rows * self.cell_height,
        )

    def cell(self, column: int, row: int) -> tuple[int, int, int, int]:
        """The (left, top, right, bottom) box of one picture, as ``Image.crop`` takes it."""
        left = self.label_width + column * self.cell_width
        top = self.header_height + row * self.cell_height
        return left, top, left + self.cell_width, top + self.cell_height


def row_label(prompt: str, seed: int, limit: int = PROMPT_CHARS) -> str:
    """The prompt on one line (cut to ``limit`` characters) and its seed on the next."""
    text = " ".join(prompt.split())
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{text}\nseed {seed}"


def default_font() -> Font:
    """PIL's built-in font: no font file to ship or find."""
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Font) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return math.ceil(right - left), math.ceil(bottom - top)


def fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: Font) -> str:
    """``text``, shortened with "..." until it fits in ``width`` pixels, so a title never spills into the next
    column."""
    if _text_size(draw, text, font)[0] <= width:
        return text
    for end in range(len(text) - 1, 0, -1):
        candidate = text[:end].rstrip() + "..."
        if _text_size(draw, candidate, font)[0] <= width:
            return candidate
    return ""


def grid_layout(
    images: Sequence[Sequence[Image.Image]], column_labels: Sequence[str], row_labels: Sequence[str]
) -> GridLayout:
    """The layout for ``images[column][row]``; every picture must have the same size."""
    if not images or not images[0]:
        raise ValueError("a grid needs at least one column and one row of pictures.")
    if len(column_labels) != len(images) or any(len(column) != len(row_labels) for column in images):
        raise ValueError(
            f"{len(images)} columns of {[len(c) for c in images]} pictures do not match {len(column_labels)} column "
            f"labels and {len(row_labels)} row labels."
        )
    sizes = {picture.size for column in images for picture in column}
    if len(sizes) != 1:
        raise ValueError(f"the pictures have different sizes ({sorted(sizes)}); render them all at one size.")
    cell_width, cell_height = sizes.pop()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = default_font()
    label_width = max(_text_size(draw, label, font)[0] for label in row_labels) + 2 * PADDING
    header_height = max(_text_size(draw, text, font)[1] for text in [*column_labels, "Ag"]) + 2 * PADDING
    return GridLayout(len(images), len(row_labels), cell_width, cell_height, label_width, header_height)


def image_grid(
    images: Sequence[Sequence[Image.Image]], column_labels: Sequence[str], row_labels: Sequence[str]
) -> Image.Image:
    """One RGB picture holding ``images[column][row]`` under the column titles and beside the row labels."""
    layout = grid_layout(images, column_labels, row_labels)
    grid = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = default_font()
    for column, label in enumerate(column_labels):
        left = layout.cell(column, 0)[0]
        title = fit(draw, label, layout.cell_width - 2 * PADDING, font)
        draw.text((left + PADDING, PADDING), title, fill=INK, font=font)
    for row, label in enumerate(row_labels):
        top = layout.cell(0, row)[1]
        draw.multiline_text((PADDING, top + PADDING), label, fill=INK, font=font)
    for column, pictures in enumerate(images):
        for row, picture in enumerate(pictures):
            grid.paste(picture.convert("RGB"), layout.cell(column, row)[:2])
    return grid
