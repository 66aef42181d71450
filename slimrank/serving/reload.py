"""Hot reload from a bundles root: ``Admin.Reload`` and a watcher that follows ``CURRENT``.

A reload verifies the bundle (``open_bundle``), loads it (a :data:`SnapshotLoader`) and warms
it up beside the served snapshot, then swaps it in with one ``SnapshotHolder.swap``. Anything
that fails leaves the served snapshot in place and counts ``slimrank_model_reload_failures``.

The watcher acts when ``CURRENT`` names another version than it last saw (a publish, promote
or rollback). A version that failed is tried again only when ``CURRENT`` moves again, or
after ``backoff_s`` if it does not. An operator's ``Admin.Reload`` of a version other than
``CURRENT`` therefore holds until ``CURRENT`` next moves. The watcher and ``Admin.Reload``
share one lock, so reloads never interleave.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from slimrank.bundle import current_version, open_bundle
from slimrank.bundle.store import resolve_version
from slimrank.errors import IntegrityError
from slimrank.serving.config import ReloadConfig
from slimrank.serving.loader import SnapshotLoader, load_snapshot
from slimrank.serving.metrics import ServingMetrics
from slimrank.serving.snapshot import (
    ModelSnapshot,
    SnapshotHolder,
    warm_up,
)
from slimrank.serving.swap import ReloadFn, replace_snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")


class BundleSource:
    """``source(version)`` verifies bundle ``version`` (None: ``CURRENT``) and loads it.

    ``resolve(version)`` names the version without loading it, so that ``Admin.Reload`` of
    the version already served answers at once.
    """

    def __init__(
        self, root: str | Path, loaders: Mapping[str, SnapshotLoader] | None = None
    ) -> None:
        self.root = Path(root)
        self.loaders = loaders

    def resolve(self, version: str | None) -> str:
        """Return the full version name ``version`` stands for; ``BundleError`` if none."""
        return resolve_version(self.root, version)

    def __call__(self, version: str | None) -> ModelSnapshot:
        with gil_shared(RELOAD_SWITCH_INTERVAL_S):
            return run_deprioritized(
                lambda: load_bundle(self.root, version, self.loaders), RELOAD_NICE
            )


def load_bundle(
    root: str | Path, version: str | None, loaders: Mapping[str, SnapshotLoader] | None = None
) -> ModelSnapshot:
    """Return the snapshot of bundle ``version`` (None: ``CURRENT``), verified then loaded."""
    return load_snapshot(open_bundle(root, version), loaders)


# While a bundle loads beside a serving event loop, the loading thread gives up the GIL this
# often (Python's default is 5 ms): each step of a call on the loop (taking it, admitting it,
# answering it) can otherwise wait that long for the GIL.
RELOAD_SWITCH_INTERVAL_S = 0.0005

# ... and runs this many nice steps below the process (Linux sets it per thread): on a machine
# whose cores are all busy, a reload at the server's own priority takes a core's time slices
# from the event loop and from the clients, and calls wait behind it for the CPU. Niced, the
# load takes what the serving threads leave; it takes longer only when the cores are busy.
RELOAD_NICE = 10


def run_deprioritized(work: Callable[[], T], nice: int) -> T:
    """Return ``work()`` run on a thread of its own, ``nice`` steps below the caller's CPU
    priority where the platform sets priorities per thread (the caller's stays as it was)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        lower_thread_priority(nice)
        try:
            outcome["value"] = work()
        except BaseException as error:  # re-raised in the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, name="slimrank-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def lower_thread_priority(steps: int) -> bool:
    """Lower the calling thread's CPU priority by ``steps`` nice steps (at most to 19); False
    where that cannot be done for one thread (not Linux) or is not allowed."""
    if sys.platform != "linux" or steps <= 0:
        return False
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + steps))
    except OSError as err:
        log.info("cannot lower the loading thread's priority: %s", err)
        return False
    return True


@contextlib.contextmanager
def gil_shared(interval_s: float) -> Iterator[None]:
    """Within the block, threads switch the GIL at most every ``interval_s`` (restored after;
    never lengthened)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, interval_s))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def bundle_reload_fn(
    root: str | Path, loaders: Mapping[str, SnapshotLoader] | None = None
) -> ReloadFn:
    """Return ``load(version)``: verify bundle ``version`` (None: ``CURRENT``) and load it."""
    return BundleSource(root, loaders)


def load_current(
    root: str | Path, loaders: Mapping[str, SnapshotLoader] | None = None
) -> ModelSnapshot:
    """Return the verified, loaded and warmed-up snapshot of ``CURRENT`` (for start-up)."""
    snapshot = load_bundle(root, None, loaders)
    warm_up(snapshot)
    return snapshot


class BundleWatcher:
    """Polls ``CURRENT`` under ``root`` and swaps in each new version that loads and warms up.

    ``poll_once`` does one check (tests call it directly); ``start`` runs it every
    ``config.poll_interval_s`` seconds in a daemon thread until ``stop``. ``lock`` must be the
    one ``Admin.Reload`` holds (``create_server(..., reload_lock=...)``).
    """

    def __init__(
        self,
        root: str | Path,
        holder: SnapshotHolder,
        load: ReloadFn,
        metrics: ServingMetrics,
        lock: threading.Lock,
        config: ReloadConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self.config = config or ReloadConfig()
        self._holder = holder
        self._load = load
        self._metrics = metrics
        self._lock = lock
        self._clock = clock
        self._seen: str | None = holder.get().version
        self._failed_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> bool:
        """Check ``CURRENT`` once; return True if a new snapshot was swapped in."""
        try:
            current = current_version(self.root)
        except (OSError, IntegrityError) as err:  # e.g. CURRENT names a missing version
            log.warning("cannot read CURRENT under %s: %s", self.root, err)
            return False
        if current is None:
            return False
        if current == self._seen:
            failed_at = self._failed_at
            if failed_at is None or self._clock() - failed_at < self.config.backoff_s:
                return False
            log.info("retrying %s after %.0f s back-off", current, self.config.backoff_s)
        self._seen = current
        self._failed_at = None
        return self._reload(current)

    def _reload(self, version: str) -> bool:
        done = replace_snapshot(
            self._holder,
            self._lock,
            lambda: self._load(version),
            self._metrics,
            version,
            skip=lambda served: served == version,
        )
        if done.error is not None:
            self._failed_at = self._clock()
        return done.version is not None

    def start(self) -> None:
        """Poll in a daemon thread (no-op when ``poll_interval_s`` is 0)."""
        if self.config.poll_interval_s == 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="slimrank-watcher", daemon=True)
        self._thread.start()
        log.info("watching %s every %.1f s", self.root / "CURRENT", self.config.poll_interval_s)

    def _run(self) -> None:
        while not self._stop.wait(self.config.poll_interval_s):
            self.poll_once()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling and wait (up to ``timeout`` s) for a reload in progress to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
