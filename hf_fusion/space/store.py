"""Every live session of one Space server: where their files are, when they were used, and the server's disk budget.

Visitors leave; their files must not stay. A session's folders are removed when its browser tab closes (gradio's
``unload``), when gradio drops its state, after ``idle_seconds`` without a request or a running job (API clients
never say goodbye), or earlier when another visitor's merge needs the room: before an output is written, the store
evicts idle sessions, least recently used first, until the output fits in ``budget_bytes``, and refuses the merge
with a clear message when the room is held by running jobs. Each server keeps its folders under its own
``server-<pid>-*`` folder, removed at shutdown; folders of servers that died are removed by the next start.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

from hf_fusion.errors import InsufficientResourcesError
from hf_fusion.output import process_alive
from hf_fusion.space.session import Session

log = logging.getLogger(__name__)

SERVER_PREFIX = "server-"


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def remove_dead_servers(parent: Path) -> list[Path]:
    """Removes the ``server-<pid>-*`` folders under ``parent`` whose process is gone (killed, crashed, restarted)."""
    removed = []
    for folder in sorted(parent.glob(f"{SERVER_PREFIX}*")) if parent.is_dir() else ():
        pid = folder.name[len(SERVER_PREFIX) :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class SessionStore:
    """The sessions of one server; thread-safe (handlers, jobs and the janitor use it at once)."""

    def __init__(self, root: Path, files_root: Path, *, idle_seconds: float, budget_bytes: int) -> None:
        if idle_seconds <= 0 or budget_bytes <= 0:
            raise ValueError("the idle time and the disk budget must be positive")
        for parent in (root, files_root):
            for folder in remove_dead_servers(parent):
                log.info("removed %s, left by a Space server that is no longer running", folder)
        server = f"{SERVER_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.root = root / server
        self.files_root = files_root / server
        self.idle_seconds = idle_seconds
        self.budget_bytes = budget_bytes
        self._sessions: dict[str, Session] = {}
        self._closing: list[Session] = []
        self._reserved: dict[str, int] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None

    # sessions -----------------------------------------------------------------------------------------------------
    def open(self, session: Session | None, visitor: str | None = None) -> Session:
        """The visitor's live session, or a new one (no folder is created until a job writes)."""
        with self._lock:
            if session is None or session.closed or self._sessions.get(session.key) is not session:
                key = secrets.token_hex(12)
                session = Session(key, self.root / f"session-{key}", self.files_root / key)
                self._sessions[key] = session
            if visitor:
                session.visitor = visitor
            session.touch()
            return session

    def close(self, session: Session | None, reason: str | None = None) -> None:
        """Ends a session: its job is stopped, its folders removed (once the job has unwound, if one was running)."""
        if session is None:
            return
        with self._lock:
            session.closed = True
            session.removed_reason = session.removed_reason or reason
            self._sessions.pop(session.key, None)
            self._reserved.pop(session.key, None)
            if session.busy:
                session.job.stop()  # type: ignore[union-attr]
                self._closing.append(session)
            else:
                session.remove_files()

    def close_visitor(self, visitor: str | None) -> int:
        """Ends every session of a browser tab that closed; returns how many."""
        if not visitor:
            return 0
        with self._lock:
            mine = [s for s in self._sessions.values() if s.visitor == visitor]
        for session in mine:
            self.close(session, "the page was closed")
        return len(mine)

    def live(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def sweep(self, now: float | None = None) -> int:
        """Closes sessions idle for longer than ``idle_seconds`` and finishes closing stopped ones; returns how many
        sessions' files were removed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [s for s in self._sessions.values() if not s.busy and now - s.last_used > self.idle_seconds]
            done = [s for s in self._closing if not s.busy]
            self._closing = [s for s in self._closing if s.busy]
        for session in idle:
            self.close(session, f"it was idle for more than {self.idle_seconds / 60:.0f} minutes")
        for session in done:
            session.remove_files()
        return len(idle) + len(done)

    # disk -----------------------------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        """What sessions hold on disk, plus what running jobs have reserved and not yet written."""
        with self._lock:
            sessions = [*self._sessions.values(), *self._closing]
            reserved = dict(self._reserved)
        return sum(max(s.disk_bytes(), reserved.get(s.key, 0)) for s in sessions)

    def reserve(self, session: Session, needed: int) -> None:
        """Makes room for ``needed`` more bytes in ``session`` (evicting idle sessions, least recently used first),
        or refuses with a message saying why; called before an output is written."""
        with self._lock:
            if needed > self.budget_bytes:
                raise InsufficientResourcesError(
                    f"this job needs {_gb(needed)} of disk, more than this Space's budget of {_gb(self.budget_bytes)} "
                    "for all visitors' files: run hf-fusion on your own machine for models this large."
                )
            self._reserved[session.key] = 0
            used = self.used_bytes()
            others = sorted(
                (s for s in self._sessions.values() if s is not session and not s.busy), key=lambda s: s.last_used
            )
            for other in others:
                if used + needed <= self.budget_bytes:
                    break
                freed = other.disk_bytes()
                self.close(other, "the Space needed its disk space for other visitors' jobs")
                used -= freed
                log.info("evicted an idle session (%s) to make room for a new job", _gb(freed))
            if used + needed > self.budget_bytes and session.merged is not None and not session.busy:
                used -= session.disk_bytes()
                session.remove_files()
            if used + needed > self.budget_bytes:
                raise InsufficientResourcesError(
                    f"this Space's disk budget of {_gb(self.budget_bytes)} is held by other visitors' running jobs "
                    f"({_gb(used)}); this job needs {_gb(needed)}. Try again when they finish."
                )
            self._reserved[session.key] = session.disk_bytes() + needed

    def settle(self, session: Session) -> None:
        """A job of ``session`` ended: its reservation becomes what it really left on disk."""
        with self._lock:
            self._reserved.pop(session.key, None)
        session.drop_empty_folders()
        session.touch()

    # lifetime -------------------------------------------------------------------------------------------------
    def start(self, interval: float | None = None) -> None:
        """Starts the janitor that removes idle sessions (every quarter of the idle time, at most every 30 s)."""
        period = interval if interval is not None else min(30.0, self.idle_seconds / 4)

        def loop() -> None:
            while not self._stop.wait(period):
                try:
                    self.sweep()
                except Exception:  # noqa: BLE001 - the janitor must outlive one bad sweep
                    log.exception("removing idle Space sessions failed")

        self._janitor = threading.Thread(target=loop, name="hf-fusion-space-janitor", daemon=True)
        self._janitor.start()

    def shutdown(self, wait: float = 10.0) -> None:
        """Stops every job and removes every session's files and the server's folders."""
        self._stop.set()
        with self._lock:
            sessions = [*self._sessions.values(), *self._closing]
        for session in sessions:
            if session.job is not None:
                session.job.stop()
        deadline = time.monotonic() + wait
        for session in sessions:
            if session.job is not None:
                session.job.wait(max(0.0, deadline - time.monotonic()))
            session.closed = True
        with self._lock:
            self._sessions.clear()
            self._closing.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.files_root, ignore_errors=True)
