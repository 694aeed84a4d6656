"""One long task of one user (a merge, a comparison), run in a background thread so the UI can follow it.

The job runs under a :class:`~hf_fusion.progress.JobMonitor`: every progress bar it opens reports here, and
:meth:`Job.stop` makes the next bar step raise :class:`~hf_fusion.errors.JobStopped`, which unwinds through the
atomic output folder (nothing half-written stays). Log records are captured per job, by thread, so two users' logs
never mix even though they share the ``hf_fusion`` logger.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from hf_fusion.errors import JobStopped
from hf_fusion.progress import JobMonitor, monitored
from hf_fusion.space.slots import Ticket

T = TypeVar("T")

LOGGER = "hf_fusion"
MAX_LOG_LINES = 400


class _ThreadLog(logging.Handler):
    """Keeps the records emitted by the job's own thread."""

    def __init__(self, job: Job[Any]) -> None:
        super().__init__(logging.DEBUG)
        self.job = job
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.job.thread_id:
            self.job.write(self.format(record))


class Job(Generic[T]):
    """Runs ``work`` once in a daemon thread; exposes its progress, log, result or error."""

    def __init__(self, work: Callable[[], T], name: str, ticket: Ticket | None = None) -> None:
        self.name = name
        self.ticket = ticket
        self.monitor = JobMonitor(on_progress=self._on_progress)
        self.stage: str = "queued"
        self.done: int = 0
        self.total: int | None = None
        self.result: T | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.thread_id: int | None = None
        self._log: deque[str] = deque(maxlen=MAX_LOG_LINES)
        self._lock = threading.Lock()
        self._work = work
        self._thread = threading.Thread(target=self._run, name=f"hf-fusion-{name}", daemon=True)

    # lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> Job[T]:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Asks the job to stop at its next progress step (a tensor, a batch, a score)."""
        if self.running:
            self.write("stop requested")
        self.monitor.stop()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        return isinstance(self.error, JobStopped)

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def follow(self, interval: float = 0.25) -> Iterator[None]:
        """Yields every ``interval`` seconds while the job runs, and once more when it has ended."""
        while self.running:
            yield
            self._thread.join(interval)
        yield

    def _run(self) -> None:
        self.thread_id = threading.get_ident()
        logger = logging.getLogger(LOGGER)
        handler = _ThreadLog(self)
        logger.addHandler(handler)
        try:
            with monitored(self.monitor):
                if self.ticket is not None:
                    self.ticket.wait(self.monitor.stop_event.is_set, self._on_wait)
                self.result = self._work()
        except BaseException as err:  # noqa: BLE001 - reported to the UI, never swallowed silently
            self.error = err
            self.write(f"stopped: {err}" if isinstance(err, JobStopped) else f"error: {err}")
        finally:
            if self.ticket is not None:
                self.ticket.release()
            logger.removeHandler(handler)
            self._work = _finished  # drop the closure (and the models it reached) before returning memory
            return_memory()

    def _on_wait(self, ahead: int) -> None:
        stage = (
            f"waiting for a free slot ({ahead} in line before this job)"
            if ahead > 1
            else "waiting for a free slot (next in line)"
        )
        if stage != self.stage:
            self.write(stage)
        self.stage, self.done, self.total = stage, 0, None

    # progress and log -------------------------------------------------------------------------------------------
    def _on_progress(self, stage: str, done: int, total: int | None) -> None:
        if stage != self.stage:
            self.write(f"{stage}: {total if total is not None else '?'} steps")
        self.stage, self.done, self.total = stage, done, total

    def write(self, line: str) -> None:
        elapsed = time.monotonic() - self.started
        with self._lock:
            self._log.append(f"[{elapsed:6.1f}s] {line}")

    def log_text(self) -> str:
        with self._lock:
            return "\n".join(self._log)

    def status(self) -> str:
        if self.running:
            count = f" {self.done}/{self.total}" if self.total else ""
            return f"{self.name}: {self.stage}{count} ({time.monotonic() - self.started:.0f} s)"
        if self.stopped:
            return f"{self.name}: stopped, nothing was kept."
        if self.error is not None:
            return f"{self.name}: failed: {self.error}"
        return f"{self.name}: done in {time.monotonic() - self.started:.1f} s"

    def fraction(self) -> float | None:
        return self.done / self.total if self.total else None


def _finished() -> Any:
    raise RuntimeError("this job has already run")


def return_memory() -> None:
    """Collects the job's garbage and hands freed heap pages back to the system.

    Tensors freed by a finished merge stay in glibc's arenas (so the server's RSS would stay at its peak while idle)
    until ``malloc_trim`` returns them; elsewhere only the garbage collection runs.
    """
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            pass
