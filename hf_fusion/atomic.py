"""Small files written whole or not at all: a reader (another process, a rerun, a crash's aftermath) sees the old
file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> Path:
    """Writes ``text`` to a temporary file beside ``path`` (named by this process, so two writers never share one),
    then renames it over ``path``."""
    return write_atomically(path, lambda partial: partial.write_text(text))


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Calls ``write`` on a temporary path beside ``path`` (named by this process), then renames it over ``path``;
    for writers that take a path (an image's ``save``)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path
