"""The Space served in-process on loopback, one server per test module, and a gradio_client for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def space_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the app keeps its sessions' folders."""
    return tmp_path_factory.mktemp("space")


@pytest.fixture(scope="module")
def space_url(space_root: Path) -> Iterator[str]:
    from hf_fusion.space import serving

    with serving(root=space_root, in_space=False, allow_local_paths=True) as url:
        yield url


@pytest.fixture
def client(space_url: str, tmp_path: Path):  # noqa: ANN201 - gradio_client.Client
    """A new client is a new session of the app (its own gr.State); files it receives land in tmp_path."""
    from gradio_client import Client

    return Client(space_url, verbose=False, download_files=str(tmp_path / "downloads"), analytics_enabled=False)
