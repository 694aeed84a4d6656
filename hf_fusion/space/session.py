"""Per-user state of the Space: a private working folder, the running job, and the last merged model.

Each browser session (or ``gradio_client.Client``) gets its own :class:`Session` through ``gr.State``; nothing
is shared between users. The folder is removed when gradio drops the state (tab closed, or after its time to
live).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_fusion.errors import FusionError
from hf_fusion.space.jobs import Job


@dataclass
class Session:
    workdir: Path
    job: Job[Any] | None = None
    merged: Path | None = None
    runs: int = 0

    @classmethod
    def create(cls, root: Path) -> "Session":
        root.mkdir(parents=True, exist_ok=True)
        return cls(Path(tempfile.mkdtemp(prefix="session-", dir=root)))

    def begin(self, job: Job[Any]) -> Job[Any]:
        """Starts ``job`` unless one is already running in this session."""
        if self.job is not None and self.job.running:
            raise FusionError(f"{self.job.name} is still running in this session: wait for it or press Stop.")
        self.runs += 1
        self.job = job
        return job.start()

    def stop(self) -> str:
        if self.job is None or not self.job.running:
            return "Nothing is running."
        self.job.stop()
        return f"Stopping {self.job.name} at its next step..."

    def new_folder(self, stem: str) -> Path:
        """A fresh folder name inside the session (not created: the merge builds it atomically)."""
        return self.workdir / f"{self.runs:03d}-{stem}"

    def keep_merged(self, folder: Path) -> None:
        """Keeps only the newest merged model (the one Push sends), so a session's disk use stays bounded."""
        if self.merged is not None and self.merged != folder:
            shutil.rmtree(self.merged, ignore_errors=True)
            for archive in self.workdir.glob(f"{self.merged.name}*.zip"):
                archive.unlink(missing_ok=True)
        self.merged = folder

    def close(self) -> None:
        if self.job is not None:
            self.job.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def close_session(session: Session | None) -> None:
    """gradio's delete callback for the session state."""
    if session is not None:
        session.close()
