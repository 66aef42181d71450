"""One reload, as ``Admin.Reload`` and the bundle watcher both do it.

:func:`replace_snapshot` loads a snapshot beside the served one, warms it up, swaps it in and
frees the old one once the calls still on it are done. Anything that fails leaves the served
snapshot in place, counts ``slimrank_model_reload_failures`` and is logged here; the caller
only decides what to answer (a gRPC status, or a retry later).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

import grpc

from slimrank.errors import SlimrankError
from slimrank.serving import heap
from slimrank.serving.metrics import ServingMetrics
from slimrank.serving.snapshot import (
    ModelSnapshot,
    SnapshotHolder,
    release_when_unused,
    warm_up,
)

log = logging.getLogger(__name__)

# Loads the snapshot of a bundle version (None: the newest); raises on any failure. One with a
# ``resolve(version) -> name`` method (``reload.BundleSource``) lets Reload answer at once
# when the name resolves to the version already served.
ReloadFn = Callable[[str | None], ModelSnapshot]


def reload_status(error: Exception) -> grpc.StatusCode:
    """The status a failed reload answers: NOT_FOUND, FAILED_PRECONDITION or INTERNAL (a bug)."""
    if isinstance(error, LookupError | FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, SlimrankError | ValueError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def one_line(error: BaseException) -> str:
    """Return ``Type: message`` of ``error`` on one line (an integrity report has several)."""
    return f"{type(error).__name__}: " + "; ".join(str(error).split("\n"))


def log_reload_failure(version: str | None, serving: str, error: Exception) -> None:
    """Log a failed reload: one WARNING line for a refused bundle, a traceback for a bug.

    A bad name, a missing or corrupt bundle are the operator's to fix and can be repeated by
    any admin caller, so they get one line, the version quoted with ``repr`` (a name is
    client input and may hold a newline). Call it inside the ``except`` block.
    """
    if reload_status(error) is grpc.StatusCode.INTERNAL:
        log.exception("reload of %r failed; still serving %s", version, serving)
    else:
        log.warning("reload of %r refused; still serving %s: %s", version, serving, one_line(error))


@dataclasses.dataclass(frozen=True)
class Replacement:
    """What one reload did.

    ``previous``: the version served when it began. ``version``: the one swapped in, None if
    none was. ``loaded``: a snapshot was loaded (False when ``skip`` said the served one will
    do). ``error``: what the load, warm-up or ``skip`` raised (nothing was swapped).
    """

    previous: str
    version: str | None = None
    loaded: bool = False
    error: Exception | None = None


def replace_snapshot(
    holder: SnapshotHolder,
    lock: threading.Lock,
    load: Callable[[], ModelSnapshot],
    metrics: ServingMetrics,
    requested: str | None,
    skip: Callable[[str], bool] = lambda served: False,
) -> Replacement:
    """Load (``load()``), warm up and swap in a snapshot unless ``skip(served version)``.

    Runs inside ``holder.loading.running()`` (admission lets the load's queue wait) and under
    ``lock`` (reloads never interleave). A loaded snapshot of the served version is not
    swapped in. ``requested`` names the version in the log.
    """
    with holder.loading.running():
        with lock:
            served = holder.get().version  # the version only: no reference to the snapshot
            try:
                if skip(served):
                    return Replacement(served)
                new = load()
                warm_up(new)
            except Exception as error:  # any failure must leave the served model in place
                metrics.reload_failures.inc()
                log_reload_failure(requested, served, error)
                # The traceback's frames hold what was loaded; the caller needs the error only.
                return Replacement(served, error=error.with_traceback(None))
            if new.version == served:
                return Replacement(served, loaded=True)
            version = new.version
            retired = [holder.swap(new)]
            del new
            metrics.reloads.inc()
        release_when_unused(retired)
        heap.refreeze()  # the new snapshot joins the collector's permanent generation
    return Replacement(served, version, loaded=True)
