"""Atomic output folders: build in a hidden sibling, rename into place only when complete.

An interrupted or failed fusion never leaves a half-written output folder, and an existing folder with files is
only replaced when the caller asks for it (``--overwrite``); then the old folder is swapped out first and removed
only after the new one is in place.
"""

from __future__ import annotations

import contextvars
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from hf_fusion.errors import FileSystemError, InsufficientResourcesError, OutputExistsError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".hf-fusion-tmp-"


def check_output_folder(target: Path, *, overwrite: bool) -> None:
    """Refuses, before any work: an existing non-empty folder (or a file) at ``target`` unless ``overwrite``, a
    path under a file, and a place the user cannot write to."""
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"output path {target} is a file, not a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {target} already exists and is not empty; pass --overwrite (overwrite=True) to replace it."
        )
    existing = nearest_existing(target.parent)
    if not existing.is_dir():
        raise OutputExistsError(f"output folder {target} cannot be created: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FileSystemError(
            f"cannot write the output folder {target}: permission denied in {existing}; "
            "choose a folder you can write to."
        )


def nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing ancestor: where a folder about to be made would live."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


DiskReservation = Callable[[Path, int], None]
_reservation: contextvars.ContextVar[DiskReservation | None] = contextvars.ContextVar(
    "hf_fusion_disk_reservation", default=None
)


@contextmanager
def disk_reservation(reserve: DiskReservation) -> Iterator[None]:
    """Calls ``reserve(target, bytes)`` before each output of this context (thread or task) is written.

    A host that shares one disk between users (the Space) uses it to keep its own budget, beside the file system's
    free space: ``reserve`` makes room or raises :class:`InsufficientResourcesError` before anything is written.
    """
    token = _reservation.set(reserve)
    try:
        yield
    finally:
        _reservation.reset(token)


def check_free_space(target: Path, needed_bytes: int) -> None:
    """Refuses early when the output filesystem (or the host's reservation) cannot hold the result (with a 1% + 64 MB
    margin on the file system)."""
    reserve = _reservation.get()
    if reserve is not None:
        reserve(target, needed_bytes)
    parent = target.parent if not target.exists() else target
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    margin = needed_bytes // 100 + (64 << 20)
    if needed_bytes + margin > free:
        raise InsufficientResourcesError(
            f"the output needs {needed_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free at {parent}."
        )


def _temp_name(kind: str, target: Path) -> str:
    """A hidden sibling's name; it carries the writer's process id, so a later run can tell a folder left by a
    killed run (its process is gone) from one that a live run is still writing."""
    return f"{TEMP_PREFIX}{kind}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_leftovers(target: Path) -> list[Path]:
    """Removes the hidden folders that runs killed while writing ``target`` left beside it (SIGKILL, power loss).

    A previous output that a killed ``--overwrite`` run had moved aside, with no output in its place, is put back
    instead of removed. Folders of runs still alive are left alone and reported. Returns what was removed.
    """
    removed: list[Path] = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for kind in ("old-", ""):
        prefix = f"{TEMP_PREFIX}{kind}{target.name}-"
        for path in sorted(parent.glob(prefix + "*")):
            pid_text = path.name[len(prefix) :].split("-")[0]
            if not pid_text.isdigit() or not path.is_dir():
                continue
            if process_alive(int(pid_text)) and int(pid_text) != os.getpid():
                log.warning("%s is being written by a running hf-fusion (process %s); left alone", path, pid_text)
                continue
            if kind == "old-" and not target.exists():
                os.replace(path, target)
                log.warning("restored %s, which an interrupted run had moved aside to %s", target, path.name)
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.info("removed %s, left by an interrupted run", path.name)
    return removed


class AtomicFolder:
    """Context manager yielding a temporary folder that becomes ``target`` on :meth:`commit`."""

    def __init__(self, target: Path, *, overwrite: bool) -> None:
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.temp = self.target.parent / _temp_name("", self.target)
        self._committed = False

    def __enter__(self) -> Path:
        clean_leftovers(self.target)
        check_output_folder(self.target, overwrite=self.overwrite)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.temp.mkdir()
        return self.temp

    def commit(self) -> None:
        """Moves the finished folder into place; replaces an existing one only with ``overwrite``."""
        check_output_folder(self.target, overwrite=self.overwrite)
        old = None
        if self.target.exists():
            old = self.target.parent / _temp_name("old-", self.target)
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
