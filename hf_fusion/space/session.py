"""Per-visitor state of the Space: private folders, the running job, and the last merged model.

Each browser session (or ``gradio_client.Client``) gets its own :class:`Session` through ``gr.State``; nothing is
shared between visitors. A session owns two folders, created only when a job first writes to them: ``workdir`` holds
merged models (never served), ``filesdir`` the files handed to the visitor (the zip, plots), inside gradio's cache so
gradio serves them without copying them. :class:`~hf_fusion.space.store.SessionStore` removes both when the session
ends, goes idle, or is evicted for disk space.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_fusion.errors import FusionError
from hf_fusion.space.jobs import Job


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist); files removed meanwhile are skipped."""
    total = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:
            continue
    return total


@dataclass(eq=False)
class Session:
    key: str
    workdir: Path
    filesdir: Path
    job: Job[Any] | None = None
    merged: Path | None = None
    archive: Path | None = None
    runs: int = 0
    visitor: str | None = None
    """gradio's session hash of the browser tab or client that uses this session (to close it when the tab closes)."""
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    removed_reason: str | None = None
    """Why the session's files were removed (idle, disk budget), for the message a returning visitor sees."""
    _starting: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.running

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def begin(self, job: Job[Any]) -> Job[Any]:
        """Starts ``job`` unless one is already running in this session (two clicks at once start one job)."""
        with self._starting:
            if self.busy:
                raise FusionError(f"{self.job.name} is still running in this session: wait for it or press Stop.")  # type: ignore[union-attr]
            self.runs += 1
            self.job = job
            self.touch()
            return job.start()

    def stop(self) -> str:
        if self.job is None or not self.job.running:
            return "Nothing is running."
        self.job.stop()
        return f"Stopping {self.job.name} at its next step..."

    def new_folder(self, stem: str) -> Path:
        """A fresh folder name inside the session (not created: the merge builds it, and its parents, atomically)."""
        return self.workdir / f"{self.runs:03d}-{stem}"

    def served_file(self, name: str) -> Path:
        """Where a file for the visitor goes (inside gradio's cache, so it is served as it is)."""
        self.filesdir.mkdir(parents=True, exist_ok=True)
        return self.filesdir / name

    def keep_merged(self, folder: Path, archive: Path | None) -> None:
        """Keeps only the newest merged model and its zip (what Push sends), so a session's disk use stays bounded."""
        if self.merged is not None and self.merged != folder:
            shutil.rmtree(self.merged, ignore_errors=True)
        if self.archive is not None and self.archive != archive:
            self.archive.unlink(missing_ok=True)
        self.merged, self.archive = folder, archive

    def disk_bytes(self) -> int:
        return folder_bytes(self.workdir) + folder_bytes(self.filesdir)

    def drop_empty_folders(self) -> None:
        """After a job that failed or was stopped: no empty folder stays behind for it."""
        for folder in (self.workdir, self.filesdir):
            try:
                folder.rmdir()
            except OSError:  # absent, or holds the session's files
                pass

    def remove_files(self) -> None:
        """Removes both folders; a running job must have been stopped and finished first."""
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.filesdir, ignore_errors=True)
        self.merged = self.archive = None
