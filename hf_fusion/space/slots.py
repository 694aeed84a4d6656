"""Server-wide admission for long jobs: a few run, a bounded line waits, the rest are refused at once.

The Space keeps its own line instead of gradio's queue, so that gradio's queue never fills: a visitor's Stop (and
every quick request) is always answered, even when every slot is busy and the line is full; a waiting job can be
stopped before it starts; and a refused request is refused in the request itself, before anything is created.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from hf_fusion.errors import InsufficientResourcesError, JobStopped


class SpaceBusyError(InsufficientResourcesError):
    """Every slot is running and the line of waiting jobs is full."""


class Ticket:
    """One admitted job's place: granted at once when a slot is free, else waiting in line."""

    def __init__(self, slots: JobSlots) -> None:
        self._slots = slots
        self.granted = False
        self.released = False

    def ahead(self) -> int:
        """How many jobs wait before this one (0 once it runs)."""
        return self._slots.position(self)

    def wait(self, stopped: Callable[[], bool], on_wait: Callable[[int], None] | None = None) -> None:
        """Blocks until a slot is free; raises :class:`JobStopped` (leaving the line) when ``stopped()`` turns true."""
        self._slots.wait_for(self, stopped, on_wait)

    def release(self) -> None:
        self._slots.release(self)


class JobSlots:
    """At most ``running`` jobs at once, and at most ``waiting`` more in line (first come, first served)."""

    def __init__(self, running: int, waiting: int) -> None:
        if running < 1 or waiting < 0:
            raise ValueError("the Space needs at least one running slot and a non-negative line")
        self.running = running
        self.waiting = waiting
        self._active = 0
        self._line: deque[Ticket] = deque()
        self._changed = threading.Condition()

    def admit(self) -> Ticket:
        """A ticket for a new job, or :class:`SpaceBusyError` when the line is full."""
        with self._changed:
            ticket = Ticket(self)
            if self._active < self.running and not self._line:
                self._active += 1
                ticket.granted = True
            elif len(self._line) < self.waiting:
                self._line.append(ticket)
            else:
                raise SpaceBusyError(
                    f"the Space is busy: {self._active} job(s) running and {len(self._line)} waiting, the most it "
                    "takes. Try again in a few minutes."
                )
            return ticket

    def position(self, ticket: Ticket) -> int:
        with self._changed:
            return 0 if ticket.granted else (list(self._line).index(ticket) + 1 if ticket in self._line else 0)

    def wait_for(self, ticket: Ticket, stopped: Callable[[], bool], on_wait: Callable[[int], None] | None) -> None:
        with self._changed:
            while not ticket.granted:
                if stopped():
                    self._line.remove(ticket)
                    ticket.released = True
                    self._changed.notify_all()
                    raise JobStopped("stopped while waiting for a free slot; nothing was started.")
                if on_wait is not None:
                    on_wait(list(self._line).index(ticket) + 1)
                self._changed.wait(0.25)

    def release(self, ticket: Ticket) -> None:
        """Frees the ticket's slot (or its place in line) and lets the next job in line start."""
        with self._changed:
            if ticket.released:
                return
            ticket.released = True
            if ticket.granted:
                self._active -= 1
            elif ticket in self._line:
                self._line.remove(ticket)
            while self._line and self._active < self.running:
                self._line.popleft().granted = True
                self._active += 1
            self._changed.notify_all()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._changed:
            return self._active, len(self._line)
