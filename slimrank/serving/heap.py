"""Short full garbage collections in the serving process.

CPython's collector walks every tracked container in a full (generation 2) collection, holding
the GIL: in ``slimrank serve`` on the ml-100k bundle, tens of thousands of long-lived objects
(modules, gRPC's, the snapshot's) made a full pass take 26-42 ms, during which no call moves.
Those objects live as long as the process or the snapshot, so the server moves them into the
collector's permanent generation (``gc.freeze``), which collections skip: once it is ready
(:func:`freeze`) and after each reload (:func:`refreeze`). A snapshot holds no reference cycle
and is freed by reference counting when a reload drops it (``tests/test_serving_heap.py``), so
freezing it leaks nothing; garbage in cycles made later is collected as before.
"""

from __future__ import annotations

import gc

_frozen = False  # freeze() ran in this process


def freeze() -> None:
    """Collect, then move every object the collector tracks into its permanent generation;
    :func:`refreeze` does the same from now on."""
    global _frozen
    gc.collect()
    gc.freeze()
    _frozen = True


def refreeze() -> None:
    """After a reload: collect what was made since the last freeze and freeze the rest (the
    new snapshot), if :func:`freeze` ran in this process; else nothing."""
    if _frozen:
        gc.collect()
        gc.freeze()


def thaw() -> None:
    """Undo :func:`freeze` (for tests and embedders): collections walk everything again."""
    global _frozen
    gc.unfreeze()
    _frozen = False
