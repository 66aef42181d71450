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

import selectors
import threading
import time
from collections.abc import Callable
from typing import Any


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
    """Bounds calls in progress: ``limit`` for the limited ones, ``total`` for all (thread-safe).

    With ``max_wait_s``, a limited call is also refused when the limited calls already in
    progress are expected to keep it waiting longer than that: their number times the mean
    time a handler takes (an exponential average of :meth:`observe`), over ``parallel``
    handlers. That bound follows the cost of a call as it changes (a new featurizer, a larger
    bundle), where a fixed ``limit`` is right for one cost only.
    """

    def __init__(
        self,
        limit: int,
        total: int,
        max_wait_s: float | None = None,
        parallel: int = 1,
        smoothing: float = 0.05,
    ) -> None:
        if limit < 1 or total < limit:
            raise ValueError(f"Admission(limit={limit}, total={total}): need 1 <= limit <= total")
        self.limit = limit
        self.total = total
        self.max_wait_s = max_wait_s
        self.parallel = max(1, parallel)
        self.smoothing = smoothing
        self.mean_service_s = 0.0  # no estimate until the first observe()
        self.lock = threading.Lock()
        self.limited_in_progress = 0
        self.total_in_progress = 0

    def observe(self, service_s: float) -> None:
        """Record how long one limited call's handler took."""
        with self.lock:
            if self.mean_service_s == 0.0:
                self.mean_service_s = service_s
            else:
                self.mean_service_s += self.smoothing * (service_s - self.mean_service_s)

    def expected_wait_s(self) -> float:
        """How long a limited call admitted now would wait for those ahead of it."""
        return self.limited_in_progress * self.mean_service_s / self.parallel

    def enter(self, limited: bool) -> Ticket | None:
        """Take a slot and return its ticket, or None when the call must be refused."""
        with self.lock:
            if self.total_in_progress >= self.total or (
                limited
                and (
                    self.limited_in_progress >= self.limit
                    or (self.max_wait_s is not None and self.expected_wait_s() > self.max_wait_s)
                )
            ):
                return None
            self.total_in_progress += 1
            if limited:
                self.limited_in_progress += 1
        return Ticket(self, limited)


class BusyClock:
    """How long the event loop has worked without a pause, for handlers run on the loop.

    A handler run inline keeps the loop from taking new calls, so waiting calls stay in grpc's
    core, where nobody can count them. What the loop can see is whether it ran out of work:
    its selector blocked for at least ``idle_gap_s`` with nothing to do (:meth:`waited`, from
    :class:`TimedSelector`). Every call waiting now arrived after the last such pause, so a
    call taken ``max_busy_s`` or more after it may have waited that long, and so may every call
    behind it; refusing them (a refusal is cheap) drains the queue until the loop pauses
    again. Time the process spends descheduled counts as work, as it should: calls queue then
    too. Used from the loop thread only.
    """

    def __init__(self, max_busy_s: float, idle_gap_s: float = 0.0005) -> None:
        if max_busy_s <= 0 or idle_gap_s <= 0:
            raise ValueError(
                f"BusyClock(max_busy_s={max_busy_s}, idle_gap_s={idle_gap_s}): need both > 0"
            )
        self.max_busy_s = max_busy_s
        self.idle_gap_s = idle_gap_s
        self.busy_since = time.perf_counter()

    def waited(self, start: float, end: float) -> None:
        """Record that the loop's selector blocked from ``start`` to ``end`` (perf_counter)."""
        if end - start >= self.idle_gap_s:
            self.busy_since = end

    def busy_for(self, now: float) -> float:
        """Seconds since the loop last paused."""
        return max(0.0, now - self.busy_since)

    def overloaded(self, now: float) -> bool:
        """True when a call taken at ``now`` should be refused."""
        return self.busy_for(now) > self.max_busy_s


class TimedSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The platform's default selector, telling ``listeners`` how long each select blocked."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Callable[[float, float], None]] = []

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        start = time.perf_counter()
        events = super().select(timeout)
        end = time.perf_counter()
        for listener in self.listeners:
            listener(start, end)
        return events
