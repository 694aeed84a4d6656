"""Fixtures for the picture comparison tests: a tiny SD 1.x pool and a tiny random CLIP model, built once."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusion_models import make_sd_pool
from image_helpers import build_clip


@pytest.fixture(scope="session")
def sd_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A base pipeline folder and two perturbed copies (32x32 pictures in a fraction of a second)."""
    return make_sd_pool(tmp_path_factory.mktemp("sd-pool"))


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")
