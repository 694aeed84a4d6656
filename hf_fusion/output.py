"""Atomic output folders: build in a hidden sibling, rename into place only when complete.

An interrupted or failed fusion never leaves a half-written output folder, and an existing folder with files is
only replaced when the caller asks for it (``--overwrite``); then the old folder is swapped out first and removed
only after the new one is in place.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType

from hf_fusion.errors import InsufficientResourcesError, OutputExistsError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".hf-fusion-tmp-"


def check_output_folder(target: Path, *, overwrite: bool) -> None:
    """Refuses an existing non-empty folder (or a file) at ``target`` unless ``overwrite``."""
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"output path {target} is a file, not a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {target} already exists and is not empty; pass --overwrite (overwrite=True) to replace it."
        )


def check_free_space(target: Path, needed_bytes: int) -> None:
    """Refuses early when the output filesystem cannot hold the result (with a 1% + 64 MB margin)."""
    parent = target.parent if not target.exists() else target
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    margin = needed_bytes // 100 + (64 << 20)
    if needed_bytes + margin > free:
        raise InsufficientResourcesError(
            f"the output needs {needed_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free at {parent}."
        )


class AtomicFolder:
    """Context manager yielding a temporary folder that becomes ``target`` on :meth:`commit`."""

    def __init__(self, target: Path, *, overwrite: bool) -> None:
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.temp = self.target.parent / f"{TEMP_PREFIX}{self.target.name}-{uuid.uuid4().hex[:8]}"
        self._committed = False

    def __enter__(self) -> Path:
        check_output_folder(self.target, overwrite=self.overwrite)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.temp.mkdir()
        return self.temp

    def commit(self) -> None:
        """Moves the finished folder into place; replaces an existing one only with ``overwrite``."""
        check_output_folder(self.target, overwrite=self.overwrite)
        old = None
        if self.target.exists():
            old = self.target.parent / f"{TEMP_PREFIX}old-{self.target.name}-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        try:
            os.replace(self.temp, self.target)
        except BaseException:
            if old is not None:
                os.replace(old, self.target)
            raise
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            shutil.rmtree(self.temp, ignore_errors=True)
            if exc_type is not None:
                log.info("fusion stopped; removed the partial output %s", self.temp)
