"""Admission: a call is accepted or refused when it arrives, before it waits anywhere.

:class:`Admission` counts the calls in progress: Recommender calls up to ``limit`` (the model
work a process takes on at once), every unary call up to ``total`` (so health and admin calls
cannot pile up either). A call over either bound is refused at once with RESOURCE_EXHAUSTED by
the caller of :meth:`Admission.enter`, which also counts it. An accepted call holds a
:class:`Ticket` until everything it started has finished (its task and, when its handler runs
on a thread, that thread's work), so a call cancelled by its client still holds its slot while
a thread works on it.
"""

from __future__ import annotations

import threading


class Ticket:
    """One accepted call's slot; given back when every :meth:`hold` has been released."""

    __slots__ = ("_admission", "_holds", "_limited")

    def __init__(self, admission: Admission, limited: bool) -> None:
        self._admission = admission
        self._limited = limited
        self._holds = 1

    def hold(self) -> None:
        """Keep the slot until one more :meth:`release` (e.g. while a thread runs the handler)."""
        with self._admission.lock:
            self._holds += 1

    def release(self, *_: object) -> None:
        """Release one hold; the last one gives the slot back. Usable as a done callback."""
        admission = self._admission
        with admission.lock:
            self._holds -= 1
            if self._holds == 0:
                admission.total_in_progress -= 1
                if self._limited:
                    admission.limited_in_progress -= 1


class Admission:
    """Bounds calls in progress: ``limit`` for the limited ones, ``total`` for all (thread-safe)."""

    def __init__(self, limit: int, total: int) -> None:
        if limit < 1 or total < limit:
            raise ValueError(f"Admission(limit={limit}, total={total}): need 1 <= limit <= total")
        self.limit = limit
        self.total = total
        self.lock = threading.Lock()
        self.limited_in_progress = 0
        self.total_in_progress = 0

    def enter(self, limited: bool) -> Ticket | None:
        """Take a slot and return its ticket, or None when the call must be refused."""
        with self.lock:
            if self.total_in_progress >= self.total or (
                limited and self.limited_in_progress >= self.limit
            ):
                return None
            self.total_in_progress += 1
            if limited:
                self.limited_in_progress += 1
        return Ticket(self, limited)
