"""The CLIP score: the bundled ``clip_score`` module equals 100 * max(cosine, 0) averaged over pairs, computed
independently from CLIPModel's image and text features, and a CLIP model that cannot load is refused early."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants
from image_helpers import clip_score, cosines
from PIL import Image

from hf_fusion.errors import RecipeError
from hf_fusion.images.clip import check_clip_model, clip_scores
from hf_fusion.metrics import MetricError, load_metric

PROMPTS = ["a photo of a cat", "red house", "a blue sky", "the tree", "a painting of a dog", "sky"]


def _pictures(count: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def test_metric_module_matches_the_independent_clip_score(clip_folder: Path) -> None:
    pictures = _pictures(len(PROMPTS))
    expected = cosines(clip_folder, pictures, PROMPTS)
    assert (expected > 0).any() and (expected < 0).any()  # the clamp at 0 is exercised
    metric, source = load_metric("clip_score", "auto")
    assert source == "bundled"
    result = metric.compute(predictions=pictures, references=PROMPTS, model_name_or_path=str(clip_folder), batch_size=4)
    assert result["clip_scores"] == pytest.approx((100 * expected.clamp(min=0)).tolist(), abs=1e-4)
    assert result["clip_score"] == pytest.approx(clip_score(clip_folder, pictures, PROMPTS), abs=1e-4)


def test_per_model_scores_average_each_models_pictures(clip_folder: Path) -> None:
    pictures = _pictures(4)
    prompts = ["red house", "a photo of a cat"]
    scores = clip_scores([pictures[:2], pictures[2:]], ["a", "b"], prompts, clip_model=str(clip_folder))
    assert scores["a"] == pytest.approx(clip_score(clip_folder, pictures[:2], prompts), abs=1e-4)
    assert scores["b"] == pytest.approx(clip_score(clip_folder, pictures[2:], prompts), abs=1e-4)


def test_a_clip_model_that_cannot_load_is_refused_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RecipeError, match="has no config.json.*--no-clip-score"):
        check_clip_model(str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RecipeError, match="'org/no-such-clip' is not in the local cache and HF_HUB_OFFLINE is set"):
        check_clip_model("org/no-such-clip")


@pytest.mark.parametrize("offline", [True, False])
def test_a_clip_model_missing_at_scoring_time_is_a_metric_error(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    where = "the local cache" + ("" if offline else " or the Hub")
    with pytest.raises(MetricError, match=f"cannot load the CLIP model 'org/no-such-clip' from {where} \\("):
        clip_scores([_pictures(1)], ["a"], ["red house"], clip_model="org/no-such-clip")
