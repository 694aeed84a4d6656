"""Shared fixtures: tiny model pools on disk, built once per session, and a quiet environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from hf_fusion.toy import make_pool  # noqa: E402


@pytest.fixture(scope="session")
def pools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    """One base and three experts per architecture (float32 safetensors)."""
    root = tmp_path_factory.mktemp("pools")
    return {arch: make_pool(root, arch, 3, seed=i) for i, arch in enumerate(["bert", "gpt2", "clip_vision"])}


@pytest.fixture(scope="session")
def bert_pool(pools: dict[str, tuple[Path, list[Path]]]) -> tuple[Path, list[Path]]:
    return pools["bert"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
