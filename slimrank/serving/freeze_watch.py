"""A thread that notices when the whole server process stood still.

A virtual machine can hold a process for a tenth of a second or more (this project's 2-core
VM did for 0.08-0.7 s at times, see the README's Catalog scale section), and so can a long
garbage collection. Calls that arrive meanwhile queue in the kernel and in gRPC's core; when
the process runs again they look like a standing queue, i.e. overload, and admission would
refuse them, although the server is not slower than its callers. The serving loop notices a
stall between two calls it takes while busy; this watch also notices one that begins while
the server is idle: it sleeps ``interval_s`` at a time, and a tick that comes a stall late
(:func:`~slimrank.serving.admission.is_stall`) or is a stall overdue is one
(:meth:`~slimrank.serving.admission.LoadActivity.stall_s`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from slimrank.serving.admission import LoadActivity

log = logging.getLogger(__name__)


class FreezeWatch:
    """Ticks ``activity`` every ``interval_s`` on a daemon thread; ``on_stall()`` runs for
    each new stall a tick finds (e.g. a metric's ``inc``)."""

    def __init__(
        self,
        activity: LoadActivity,
        interval_s: float,
        on_stall: Callable[[], None] = lambda: None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"FreezeWatch(interval_s={interval_s}): must be > 0")
        self.activity = activity
        self.interval_s = interval_s
        self._on_stall = on_stall
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slimrank-freeze-watch", daemon=True)

    def start(self) -> FreezeWatch:
        """Start ticking; returns self."""
        self.activity.watched(self.interval_s)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop ticking (the activity no longer expects ticks) and wait for the thread."""
        self._stop.set()
        self.activity.watched(None)
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.activity.tick():
                log.debug("the process stood still for %.3f s", self.activity.stall_s())
                self._on_stall()
