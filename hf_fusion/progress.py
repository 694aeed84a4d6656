"""Progress bars that behave like huggingface_hub's: off with ``HF_HUB_DISABLE_PROGRESS_BARS=1`` or ``--quiet``.

A :class:`JobMonitor` made current with :func:`monitored` also sees every bar of the job running in that context
(whether or not the bar is drawn), and can stop the job: the next bar step, or :func:`check_stop` call, raises
:class:`~hf_fusion.errors.JobStopped`. The Space uses it for its progress bar and its Stop button; the engine and
the evaluation loops need no knowledge of either.
"""

from __future__ import annotations

import contextvars
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from huggingface_hub.utils import tqdm as _hub_tqdm

from hf_fusion.errors import JobStopped


@dataclass
class JobMonitor:
    """Progress of the bars a job opens, and a stop flag another thread may set."""

    on_progress: Callable[[str, int, int | None], None] | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self.stop_event.set()

    def check(self) -> None:
        if self.stop_event.is_set():
            raise JobStopped("stopped on request; nothing was written.")

    def report(self, desc: str, done: int, total: int | None) -> None:
        if self.on_progress is not None:
            self.on_progress(desc, done, total)


_current: contextvars.ContextVar[JobMonitor | None] = contextvars.ContextVar("hf_fusion_monitor", default=None)


@contextmanager
def monitored(monitor: JobMonitor) -> Iterator[JobMonitor]:
    """Makes ``monitor`` see the bars opened in this context (thread or task) until the block ends."""
    token = _current.set(monitor)
    try:
        yield monitor
    finally:
        _current.reset(token)


def check_stop() -> None:
    """Raises :class:`JobStopped` when the current job was asked to stop; a no-op outside a monitored job."""
    monitor = _current.get()
    if monitor is not None:
        monitor.check()


class _ObservedBar:
    """A bar whose steps are reported to a monitor, which may stop the job between them."""

    def __init__(self, bar: Any, monitor: JobMonitor, desc: str, total: int | None) -> None:
        self._bar, self._monitor, self._desc, self._total, self._done = bar, monitor, desc, total, 0
        monitor.check()
        monitor.report(desc, 0, total)

    def update(self, n: int = 1) -> Any:
        result = self._bar.update(n)
        self._done += n
        self._monitor.report(self._desc, self._done, self._total)
        self._monitor.check()
        return result

    def __enter__(self) -> "_ObservedBar":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._bar.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


def progress_bar(*, total: int, desc: str, unit: str, disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar named under ``hf_fusion`` so huggingface_hub's per-group switches apply to it too."""
    bar = _hub_tqdm(total=total, desc=desc, unit=unit, disable=disable or None, name="hf_fusion", **kwargs)
    monitor = _current.get()
    return bar if monitor is None else _ObservedBar(bar, monitor, desc, total)
