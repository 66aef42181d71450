"""A stop asked for by a signal handler and waited on by the main thread.

``threading.Event`` cannot be set from a signal handler safely. Python runs the handler in
the main thread between two bytecodes; if those are inside ``Event.wait()`` while it holds
the Event's lock (just woken by an earlier signal), ``Event.set()`` waits on that lock
forever. This hung a ``--workers`` worker: its process group's SIGTERM woke it, and the
parent's forwarded SIGTERM arrived while it re-took the lock (py-spy showed ``Event.set``
inside ``Event.wait``; 2 of 34 stops on a busy machine). :class:`StopRequest`'s handler only
sets a flag and writes a byte to a pipe, and :meth:`StopRequest.wait` selects on that pipe.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Iterable, Iterator


class StopRequest:
    """A flag a signal handler sets (:meth:`set`) and the main thread waits for."""

    def __init__(self) -> None:
        self._flag = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def set(self, *_: object) -> None:
        """Ask for the stop; safe in a signal handler (takes no lock). Usable as one."""
        self._flag = True
        with contextlib.suppress(OSError):  # a full pipe (or a closed one) wakes no less
            os.write(self._write, b"\0")

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a stop is asked for or ``timeout`` s pass; return :meth:`is_set`."""
        if not self._flag:
            # The byte stays in the pipe: once asked, every later wait returns at once.
            select.select([self._read], [], [], timeout)
        return self._flag

    def close(self) -> None:
        """Close the pipe (after the signal handlers were put back)."""
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def stop_on(
    signals: Iterable[signal.Signals], then: signal.Handlers | None = None
) -> Iterator[StopRequest]:
    """Within the block, each of ``signals`` asks the yielded request to stop; afterwards the
    previous handlers are put back, or ``then`` is installed for each (e.g. ``SIG_IGN``: a
    process that has stopped and is exiting is not killed by a late signal). Main thread
    only, as ``signal.signal`` requires."""
    request = StopRequest()
    previous = {sig: signal.signal(sig, request.set) for sig in signals}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if then is None else then)
        request.close()
