"""The stop a signal handler asks for: it never deadlocks the main thread that waits for it.

With ``threading.Event`` as the stop, a burst of signals deadlocks the waiting main thread:
a handler's ``Event.set`` is interrupted by the next signal right after it took the Event's
lock, and the next handler waits on that lock forever (a ``--workers`` worker hung so after
its process group's SIGTERM and its parent's; the script below hung with an Event in 5 of 6
runs). Each run is a subprocess, so a deadlock fails the test by its timeout instead of
hanging pytest.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from slimrank.serving.stop_request import StopRequest, stop_on

BURST = """
import os, signal, threading
from slimrank.serving.stop_request import StopRequest
stop = StopRequest()
signal.signal(signal.SIGUSR1, stop.set)
def fire():
    for _ in range(20000):
        os.kill(os.getpid(), signal.SIGUSR1)
thread = threading.Thread(target=fire)
thread.start()
while thread.is_alive():
    stop.wait(0.01)
assert stop.is_set() and stop.wait() and stop.wait(0)
print("done")
"""


@pytest.mark.parametrize("run", range(3))
def test_a_burst_of_signals_never_deadlocks_the_waiting_main_thread(run: int) -> None:
    done = subprocess.run([sys.executable, "-c", BURST], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr


def test_wait_returns_whether_a_stop_was_asked_and_stays_asked() -> None:
    stop = StopRequest()
    try:
        started = time.monotonic()
        assert stop.wait(0.05) is False and not stop.is_set()
        assert time.monotonic() - started >= 0.04  # it waited
        stop.set()
        stop.set()  # asked twice: the same
        started = time.monotonic()
        assert stop.wait() is True and stop.wait(10) is True and stop.is_set()
        assert time.monotonic() - started < 1.0  # at once, every time
    finally:
        stop.close()


def test_stop_on_asks_the_stop_on_each_signal_and_puts_the_handlers_back() -> None:
    def before(*_: object) -> None:
        raise AssertionError("the previous handler ran within the block")

    previous = signal.signal(signal.SIGUSR2, before)
    try:
        with stop_on([signal.SIGUSR2]) as stop:
            assert not stop.is_set()
            signal.raise_signal(signal.SIGUSR2)
            assert stop.wait(5) and stop.is_set()
        assert signal.getsignal(signal.SIGUSR2) is before
    finally:
        signal.signal(signal.SIGUSR2, previous)
