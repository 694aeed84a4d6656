"""A public app (only Hub ids, catalog pools, built-in models) served on loopback with its own gradio cache, so a
test can see every file the app makes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def serve_public(sessions: Path, cache: Path, limits: object) -> Iterator[str]:
    """Serves the app with sessions under ``sessions`` and gradio's cache at ``cache``; yields its URL."""
    from hf_fusion.space import serving

    patch = pytest.MonkeyPatch()
    patch.setenv("GRADIO_TEMP_DIR", str(cache))
    try:
        with serving(root=sessions, in_space=False, allow_local_paths=False, limits=limits) as url:
            yield url
    finally:
        patch.undo()
