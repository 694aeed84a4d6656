"""The labelled grid: cells hold the pictures untouched, in model columns and prompt x seed rows, beside labels."""

from __future__ import annotations

import numpy as np
import pytest
from image_helpers import same_pixels
from PIL import Image, ImageDraw

from hf_fusion.images.grid import default_font, fit, grid_layout, image_grid, row_label


def _pictures(columns: int, rows: int, size: tuple[int, int] = (40, 24)) -> list[list[Image.Image]]:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3)
    return [[Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(rows)] for _ in range(columns)]


def test_cells_hold_the_pictures_and_the_size_is_cells_plus_labels() -> None:
    pictures = _pictures(3, 2)
    rows = [row_label("a photo of a cat", 0), row_label("a photo of a cat", 1)]
    grid = image_grid(pictures, ["base", "expert-0", "expert-1"], rows)
    layout = grid_layout(pictures, ["base", "expert-0", "expert-1"], rows)
    assert layout.label_width > 0 and layout.header_height > 0
    assert grid.size == (layout.label_width + 3 * 40, layout.header_height + 2 * 24)
    for column in range(3):
        for row in range(2):
            assert same_pixels(grid.crop(layout.cell(column, row)), pictures[column][row])


def test_labels_are_drawn_in_their_bands() -> None:
    pictures = [[Image.new("RGB", (64, 16), (255, 255, 255))]]
    grid = image_grid(pictures, ["model"], ["red house\nseed 3"])
    layout = grid_layout(pictures, ["model"], ["red house\nseed 3"])
    header = np.asarray(grid.crop((layout.label_width, 0, grid.width, layout.header_height)))
    labels = np.asarray(grid.crop((0, layout.header_height, layout.label_width, grid.height)))
    assert (header < 128).any() and (labels < 128).any()  # dark text on white


def test_row_label_cuts_long_prompts_and_names_the_seed() -> None:
    label = row_label("a   painting of\na house " + "very " * 20 + "tall", 7, limit=30)
    first, second = label.split("\n")
    assert len(first) <= 30 and first.endswith("...") and first.startswith("a painting of a house very")
    assert second == "seed 7"


def test_titles_are_shortened_to_fit_their_column() -> None:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title = fit(draw, "organisation/a-very-long-model-name", 60, default_font())
    assert title.endswith("...") and draw.textlength(title, font=default_font()) <= 60
    assert fit(draw, "short", 200, default_font()) == "short"


def test_pictures_of_different_sizes_are_refused() -> None:
    pictures = [[Image.new("RGB", (32, 32))], [Image.new("RGB", (32, 40))]]
    with pytest.raises(ValueError, match="different sizes"):
        image_grid(pictures, ["a", "b"], ["row"])
    with pytest.raises(ValueError, match="do not match"):
        image_grid(pictures, ["a"], ["row"])
