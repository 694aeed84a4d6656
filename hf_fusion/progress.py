"""Progress bars that behave like huggingface_hub's: off with ``HF_HUB_DISABLE_PROGRESS_BARS=1`` or ``--quiet``.

A :class:`JobMonitor` made current with :func:`monitored` also sees every bar of the job running in that context
(whether or not the bar is drawn), and can stop the job: the next bar step, or :func:`check_stop` call, raises
:class:`~hf_fusion.errors.JobStopped`. The Space uses it for its progress bar and its Stop button; the engine and
the evaluation loops need no knowledge of either.

Where no bar is drawn although progress is wanted (stderr is a file or a CI log, or bars are switched off), a bar
logs a line every ``HF_FUSION_PROGRESS_INTERVAL`` seconds (30 by default, 0 for none) through the ``hf_fusion.progress``
logger: ``evaluating bbc_news (fused): 320/501 examples, 40 s``. ``--quiet`` silences them with the other messages.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub.utils import tqdm as _hub_tqdm

from hf_fusion.errors import FusionError, JobStopped

INTERVAL_ENV = "HF_FUSION_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0
progress_log = logging.getLogger("hf_fusion.progress")
_clock = time.monotonic  # the log lines' clock (tests replace it; tqdm keeps its own)


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

    def __enter__(self) -> _ObservedBar:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._bar.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


def log_interval() -> float:
    """Seconds between progress log lines (``HF_FUSION_PROGRESS_INTERVAL``); 0 turns them off."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise FusionError(
            f"{INTERVAL_ENV}={raw!r} is not a number of seconds: set it to 0 (no progress lines) or "
            f"more (default {DEFAULT_INTERVAL_S:g})."
        )
    return value


def _elapsed(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole} s" if whole < 60 else f"{whole // 60} min {whole % 60} s"


class _LoggedBar:
    """A bar that is not drawn and instead logs its state every ``interval`` seconds, and once more at the end
    when it logged before and moved since (so a log shows that a long step finished)."""

    def __init__(self, bar: Any, desc: str, total: int | None, unit: str, interval: float) -> None:
        self._bar, self._desc, self._total, self._unit, self._interval = bar, desc, total, unit, interval
        self._done, self._logged_at = 0, None  # the count of the last line logged
        self._start = self._last = _clock()

    def _line(self, now: float) -> None:
        count = f"{self._done}/{self._total}" if self._total is not None else str(self._done)
        progress_log.info("%s: %s %ss, %s", self._desc, count, self._unit, _elapsed(now - self._start))
        self._logged_at = self._done

    def _final_line(self) -> None:
        if self._logged_at is not None and self._logged_at != self._done:
            self._line(_clock())

    def update(self, n: int = 1) -> Any:
        result = self._bar.update(n)
        self._done += n
        now = _clock()
        if now - self._last >= self._interval:
            self._last = now
            self._line(now)
        return result

    def close(self) -> None:
        self._final_line()
        self._bar.close()

    def __enter__(self) -> _LoggedBar:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        if exc[0] is None:
            self._final_line()
        return self._bar.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


def progress_bar(*, total: int, desc: str, unit: str, disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar named under ``hf_fusion`` so huggingface_hub's per-group switches apply to it too; where it is
    not drawn (no terminal, or bars switched off) but progress is wanted, it logs periodic lines instead."""
    bar = _hub_tqdm(total=total, desc=desc, unit=unit, disable=disable or None, name="hf_fusion", **kwargs)
    if not disable and getattr(bar, "disable", False):
        interval = log_interval()
        if interval > 0:
            bar = _LoggedBar(bar, desc, total, unit, interval)
    monitor = _current.get()
    return bar if monitor is None else _ObservedBar(bar, monitor, desc, total)
