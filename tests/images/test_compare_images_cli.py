"""`hf-fusion compare-images` end to end: the grid's cells are plain diffusers renders, the scores are CLIP scores
computed independently, and bad input stops the command before any model loads, with nothing written."""

from __future__ import annotations

import json

import pytest
import transformers
from diffusers import DiffusionPipeline
from image_helpers import clip_score, render_plainly, same_pixels
from PIL import Image

from hf_fusion.cli import main

TINY = ["--steps", "2", "--height", "32", "--width", "32"]
TOKEN = "hf_never_printed_" + "q8Zt" * 5


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pipeline or CLIP load fails the test: the refusals under test must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", refuse)


def _cells(grid: Image.Image, record: dict, column: int, row: int) -> Image.Image:
    left, top = record["grid"]["first_cell"]
    width, height = record["grid"]["cell_size"]
    return grid.crop((left + column * width, top + row * height, left + (column + 1) * width, top + (row + 1) * height))


@pytest.mark.slow
def test_grid_cells_and_scores_match_independent_computations(sd_pool, clip_folder, tmp_path, capsys) -> None:
    base, experts = sd_pool
    models = [base, *experts]
    (tmp_path / "prompts.txt").write_text("\na photo of a cat\n\n")
    output = tmp_path / "report" / "grid.png"
    args = [*map(str, models), "--prompts", str(tmp_path / "prompts.txt"), "--prompt", "red house", "--seed", "0"]
    args += ["--seed", "4", *TINY, "--clip-model", str(clip_folder), "--output", str(output), "--token", TOKEN]
    assert main(["compare-images", *args]) == 0
    out = capsys.readouterr()

    record = json.loads(output.with_suffix(".json").read_text())
    rows = [(p, s) for p in ["a photo of a cat", "red house"] for s in (0, 4)]
    assert record["grid"]["rows"] == [{"prompt": p, "seed": s} for p, s in rows]
    assert [m["model"] for m in record["models"]] == [str(m) for m in models]
    assert record["grid"]["columns"] == ["sd-base", "sd-expert-0", "sd-expert-1"]
    assert record["settings"]["steps"] == 2 and record["settings"]["scheduler"]["class"] == "DDIMScheduler"
    grid = Image.open(output)
    left, top = record["grid"]["first_cell"]
    assert record["grid"]["cell_size"] == [32, 32] and left > 0 and top > 0
    assert grid.size == (left + 3 * 32, top + 4 * 32)

    for column, (model, entry) in enumerate(zip(models, record["models"])):
        plain = render_plainly(model, rows)
        assert all(same_pixels(_cells(grid, record, column, row), plain[row]) for row in range(len(rows)))
        expected = clip_score(clip_folder, plain, [prompt for prompt, _ in rows])
        assert entry["clip_score"] == pytest.approx(expected, abs=1e-4)
        assert f"| {entry['label']}{' (reference)' if column == 0 else ''} | {expected:.2f} |" in out.out
    assert TOKEN not in out.out + out.err
    assert sorted(p.name for p in output.parent.iterdir()) == ["grid.json", "grid.png"]


@pytest.mark.slow
def test_overwrite_replaces_and_no_clip_score_skips_the_scores(sd_pool, tmp_path, capsys) -> None:
    base, _ = sd_pool
    output = tmp_path / "grid.png"
    output.write_bytes(b"old")
    args = ["compare-images", str(base), "--prompt", "red house", *TINY, "--output", str(output), "--no-clip-score"]
    assert main([*args, "--overwrite"]) == 0
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["models"][0]["clip_score"] is None and record["clip_model"] is None
    assert same_pixels(_cells(Image.open(output), record, 0, 0), render_plainly(base, [("red house", 0)])[0])
    assert "CLIP score" not in capsys.readouterr().out


def _fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["compare-images", *args, "--token", TOKEN]) == 1
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    return out.err


def test_bad_input_fails_before_loading_and_writes_nothing(sd_pool, tmp_path, capsys, no_loading) -> None:
    base, experts = sd_pool
    output = tmp_path / "out" / "grid.png"
    models = [str(base), str(experts[0])]

    err = _fails([*models, "--prompts", str(tmp_path / "missing.txt"), "--output", str(output)], capsys)
    assert "prompts file" in err and "missing.txt not found" in err
    assert not output.parent.exists()

    err = _fails([str(base), str(base / "unet"), "--prompt", "red house", "--output", str(output)], capsys)
    assert "has no model_index.json" in err and "not a component such as unet/" in err
    assert not output.parent.exists()

    err = _fails([*models, "--prompt", "red house", "--height", "100", "--output", str(output)], capsys)
    assert "height must be a positive multiple of 8 (the VAE's scale), got 100." in err

    err = _fails([*models, "--prompt", "red house", "--clip-model", str(tmp_path), "--output", str(output)], capsys)
    assert "has no config.json" in err and "--no-clip-score" in err
    assert not output.parent.exists()

    output.parent.mkdir()
    output.write_bytes(b"earlier grid")
    err = _fails([*models, "--prompt", "red house", "--output", str(output)], capsys)
    assert "grid.png already exists; pass --overwrite to replace it" in err
    assert output.read_bytes() == b"earlier grid" and sorted(output.parent.iterdir()) == [output]


def test_help_lists_the_command_and_its_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["compare-images", "--help"])
    text = capsys.readouterr().out
    for flag in ["--prompts", "--seed", "--guidance-scale", "--clip-model", "--no-clip-score", "--overwrite"]:
        assert flag in text
