"""Rendering: every model draws each prompt x seed under the reference's scheduler, exactly as plain diffusers would,
and inputs that cannot work are refused before any pipeline loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler
from image_helpers import render_plainly, same_pixels

from hf_fusion.errors import IncompatibleModelsError, RecipeError
from hf_fusion.images.render import RenderSettings, model_labels, render
from hf_fusion.recipe import ModelRef

TINY = RenderSettings(steps=2, height=32, width=32)


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pipeline load fails the test: the refusals under test must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pipeline was loaded")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)


def _with_scheduler(source: Path, target: Path, scheduler: type) -> Path:
    """A copy of a pipeline folder whose saved scheduler is another class (a model shipped with another sampler)."""
    shutil.copytree(source, target)
    config = json.loads((target / "scheduler" / "scheduler_config.json").read_text())
    scheduler.from_config(config).save_pretrained(target / "scheduler")
    index = json.loads((target / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", scheduler.__name__]
    (target / "model_index.json").write_text(json.dumps(index))
    return target


@pytest.mark.slow
def test_every_column_equals_plain_diffusers_under_the_reference_scheduler(sd_pool, tmp_path: Path) -> None:
    base, experts = sd_pool
    euler = _with_scheduler(experts[0], tmp_path / "expert-euler", EulerDiscreteScheduler)
    rendering = render([str(base), str(euler)], ["a photo of a cat", "red house"], [0, 3], TINY, show_progress=False)
    assert rendering.rows == [("a photo of a cat", 0), ("a photo of a cat", 3), ("red house", 0), ("red house", 3)]
    assert rendering.labels == ["sd-base", "expert-euler"]
    assert rendering.scheduler["class"] == "DDIMScheduler"
    plain = render_plainly(base, rendering.rows)
    assert all(same_pixels(mine, theirs) for mine, theirs in zip(rendering.images[0], plain))
    plain = render_plainly(euler, rendering.rows, scheduler_from=base)
    assert all(same_pixels(mine, theirs) for mine, theirs in zip(rendering.images[1], plain))
    own_sampler = render_plainly(euler, rendering.rows[:1])[0]
    assert not same_pixels(rendering.images[1][0], own_sampler)  # the swap mattered


@pytest.mark.slow
def test_a_hub_repo_renders_like_its_folder(sd_pool, hub) -> None:
    base, _ = sd_pool
    files = {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}
    hub.state.create("alice/tiny-sd")
    hub.state.upload("alice/tiny-sd", files)
    rendering = render(["alice/tiny-sd"], ["red house"], [5], TINY, show_progress=False)
    assert rendering.labels == ["alice/tiny-sd"]
    assert same_pixels(rendering.images[0][0], render_plainly(base, [("red house", 5)])[0])


def test_a_folder_without_model_index_is_refused_before_loading(sd_pool, no_loading) -> None:
    base, _ = sd_pool
    with pytest.raises(RecipeError, match=r"no model_index.json.*not a component such as unet/"):
        render([str(base), str(base / "unet")], ["red house"], [0], TINY)
    with pytest.raises(RecipeError, match="is neither a folder nor a Hub repo id"):
        render([str(base), str(base / "missing")], ["red house"], [0], TINY)
    with pytest.raises(RecipeError, match="'org/name/extra' is neither a folder nor a Hub repo id"):
        render([str(base), "org/name/extra"], ["red house"], [0], TINY)


@pytest.mark.parametrize(
    ("prompts", "seeds", "settings", "message"),
    [
        ([], [0], TINY, "no prompts"),
        (["a cat", "  "], [0], TINY, "prompt 2 is empty"),
        (["a cat"], [], TINY, "no seeds"),
        (["a cat"], [2**64], TINY, "seeds must be from 0 to 2\\*\\*64 - 1"),
        (["a cat"], [0], RenderSettings(steps=0), "steps must be at least 1"),
        (["a cat"], [0], RenderSettings(height=500), "height must be a positive multiple of 8"),
        (["a cat"], [0], RenderSettings(width=0), "width must be a positive multiple of 8"),
        (["a cat"], [0], RenderSettings(dtype="float8"), "dtype must be one of"),
        (["a cat"], [0], RenderSettings(device="gpu:7"), "unknown device 'gpu:7'"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_loading(
    sd_pool, no_loading, prompts: list[str], seeds: list[int], settings: RenderSettings, message: str
) -> None:
    base, experts = sd_pool
    with pytest.raises(RecipeError, match=message):
        render([str(base), str(experts[0])], prompts, seeds, settings)


def test_different_kinds_of_pipeline_are_refused_before_loading(sd_pool, no_loading, tmp_path: Path) -> None:
    base, _ = sd_pool
    other = tmp_path / "xl"
    other.mkdir()
    index = json.loads((base / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(IncompatibleModelsError, match=r"reference .* is a StableDiffusionPipeline; .*xl is a Stable"):
        render([str(base), str(other)], ["red house"], [0], TINY)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"unet": ["my_unet", "FancyUNet"]}, r"unet \(my_unet.FancyUNet\)"),
        ({"_class_name": ["pipeline", "MyPipeline"]}, "pipeline.MyPipeline"),
        ({"_class_name": "MyPipeline"}, "MyPipeline"),
    ],
)
def test_pipelines_that_need_their_own_code_are_refused_before_loading(
    sd_pool, no_loading, tmp_path: Path, change: dict, named: str
) -> None:
    base, _ = sd_pool
    custom = tmp_path / "custom"
    custom.mkdir()
    index = json.loads((base / "model_index.json").read_text())
    (custom / "model_index.json").write_text(json.dumps({**index, **change}))
    with pytest.raises(RecipeError, match=f"needs code that ships with the model.*{named}.*never runs a model's own"):
        render([str(custom)], ["red house"], [0], TINY)


def test_labels_name_folders_and_repos_and_tell_twins_apart(tmp_path: Path) -> None:
    (tmp_path / "a" / "unet").mkdir(parents=True)
    (tmp_path / "b" / "unet").mkdir(parents=True)
    refs = [ModelRef.parse(str(tmp_path / "a" / "unet")), ModelRef.parse(str(tmp_path / "b" / "unet"))]
    assert model_labels([*refs, ModelRef.parse("org/model@v2")]) == ["unet (1)", "unet (2)", "org/model@v2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_missing_cuda_device_is_refused_before_loading(sd_pool, no_loading) -> None:
    base, _ = sd_pool
    with pytest.raises(RecipeError, match="torch sees no CUDA device; use --device cpu"):
        render([str(base)], ["red house"], [0], RenderSettings(device="cuda"))
