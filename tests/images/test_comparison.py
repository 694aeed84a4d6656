"""Saving a comparison: the grid and its JSON record are written whole, never over existing files unless asked, and
prompts files and output names that cannot work are refused with a message saying what to do."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from image_helpers import same_pixels
from PIL import Image

from hf_fusion.errors import FileSystemError, OutputExistsError, RecipeError
from hf_fusion.images.comparison import ImageComparison, check_output, read_prompts
from hf_fusion.images.render import RenderSettings


def _comparison() -> ImageComparison:
    colours = [(200, 0, 0), (0, 200, 0)]
    return ImageComparison(
        models=["./base", "org/expert"],
        labels=["base", "org/expert"],
        prompts=["red house"],
        seeds=[0, 1],
        settings=RenderSettings(steps=2, height=16, width=24),
        scheduler={"class": "DDIMScheduler", "config": {}},
        images=[[Image.new("RGB", (24, 16), colour)] * 2 for colour in colours],
        clip_model="tiny-clip",
        clip_scores={"base": 21.5, "org/expert": 0.0},
    )


def test_save_writes_the_grid_and_a_record_that_finds_each_cell(tmp_path: Path) -> None:
    comparison = _comparison()
    picture, record = comparison.save(tmp_path / "out" / "grid.png")
    assert record == tmp_path / "out" / "grid.json"
    assert sorted(p.name for p in picture.parent.iterdir()) == ["grid.json", "grid.png"]  # no partial file left
    data = json.loads(record.read_text())
    assert data["prompts"] == ["red house"] and data["seeds"] == [0, 1]
    assert data["models"] == [
        {"model": "./base", "label": "base", "clip_score": 21.5},
        {"model": "org/expert", "label": "org/expert", "clip_score": 0.0},
    ]
    assert data["settings"]["steps"] == 2 and data["settings"]["scheduler"]["class"] == "DDIMScheduler"
    assert data["clip_model"] == "tiny-clip"
    assert data["grid"]["rows"] == [{"prompt": "red house", "seed": 0}, {"prompt": "red house", "seed": 1}]
    left, top = data["grid"]["first_cell"]
    width, height = data["grid"]["cell_size"]
    grid = Image.open(picture)
    assert grid.size == (left + 2 * width, top + 2 * height)
    second_column = grid.crop((left + width, top + height, left + 2 * width, top + 2 * height))
    assert same_pixels(second_column, comparison.images[1][1])


def test_existing_files_are_kept_unless_overwrite(tmp_path: Path) -> None:
    output = tmp_path / "grid.png"
    output.write_bytes(b"old picture")
    with pytest.raises(OutputExistsError, match="grid.png already exists; pass --overwrite"):
        _comparison().save(output)
    assert output.read_bytes() == b"old picture"
    output.unlink()
    (tmp_path / "grid.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="grid.json already exists"):
        check_output(output, overwrite=False)
    _comparison().save(output, overwrite=True)
    assert Image.open(output).format == "PNG" and "prompts" in json.loads((tmp_path / "grid.json").read_text())


def test_output_names_that_cannot_work_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="must be a .png file"):
        check_output(tmp_path / "grid.jpg", overwrite=False)
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(OutputExistsError, match="is a folder"):
        check_output(tmp_path / "taken.png", overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputExistsError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "grid.png", overwrite=False)


def test_an_unwritable_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # as for a user without rights
    with pytest.raises(FileSystemError, match="permission denied in .*; choose a folder you can write to"):
        check_output(tmp_path / "new" / "grid.png", overwrite=False)


def test_prompts_files(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\n  red house  \n\n")
    assert read_prompts(prompts) == ["a photo of a cat", "red house"]
    with pytest.raises(RecipeError, match="prompts file .*missing.txt not found"):
        read_prompts(tmp_path / "missing.txt")
    prompts.write_text("\n  \n")
    with pytest.raises(RecipeError, match="holds no prompt"):
        read_prompts(prompts)
    prompts.write_bytes(b"\xff\xfe bad")
    with pytest.raises(RecipeError, match="is not UTF-8 text"):
        read_prompts(prompts)
