"""The serving process freezes its long-lived heap, and a snapshot is freed without the collector.

``slimrank.serving.heap`` moves what lives as long as the process or the snapshot into the
garbage collector's permanent generation, which collections never walk. That is safe only if a
snapshot that a reload drops is freed by reference counting alone: a reference cycle in it
would leak the whole bundle (~2 GiB at 1M items) on every reload. These tests load the tiny
pipeline's real bundle, as the server does, with the collector off.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import weakref
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from tiny_pipeline import TinyRun, tiny_pipeline

from slimrank.serving import heap
from slimrank.serving.metrics import ServingMetrics
from slimrank.serving.reload import load_current
from slimrank.serving.snapshot import SnapshotHolder, warm_up
from slimrank.serving.swap import replace_snapshot


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return tiny_pipeline(tmp_path_factory)


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The collector disabled for the test (only reference counting frees), then restored;
    and whatever the test froze thawed again."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        heap.thaw()
        if was_enabled:
            gc.enable()


def tracked(obj: object) -> bool:
    """Whether the collector's generations (not the permanent one) hold ``obj``."""
    return any(o is obj for o in gc.get_objects())


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_a_served_pipeline_snapshot_is_freed_by_reference_counting_alone(
    run: TinyRun, collector_off: None
) -> None:
    snapshot = load_current(run.bundles)
    warm_up(snapshot)
    assert snapshot.user_query("u3", []).source.name == "KNOWN"  # a real, used snapshot
    ref = weakref.ref(snapshot)
    del snapshot
    assert ref() is None, "a reference cycle keeps the snapshot: freezing the heap would leak it"


def dropped_cycle() -> weakref.ref:
    """Make two Nodes that refer to each other, drop them, and return a weak reference to
    one: alive until a collection (the collector is off)."""
    cycle = Node()
    cycle.other = Node()
    cycle.other.other = cycle
    garbage = weakref.ref(cycle)
    del cycle
    assert garbage() is not None  # the collector is off: the cycle lives on
    return garbage


def test_a_reload_frees_the_old_snapshot_and_freezes_the_new_one(
    run: TinyRun, collector_off: None
) -> None:
    """After freeze(), a reload (replace_snapshot) drops the old snapshot, freed at once with
    the collector off, and the new one joins the permanent generation; garbage in a cycle
    made before a freeze is collected by it, not frozen."""
    holder = SnapshotHolder(load_current(run.bundles))
    warm_up(holder.get())
    garbage = dropped_cycle()
    heap.freeze()
    assert garbage() is None  # collected before freezing
    old = weakref.ref(holder.get())
    assert not tracked(holder.get())  # frozen
    renamed = dataclasses.replace(load_current(run.bundles), version="v-new")
    assert tracked(renamed)
    metrics = ServingMetrics(CollectorRegistry())
    done = replace_snapshot(holder, threading.Lock(), lambda: renamed, metrics, "v-new")
    assert done.version == "v-new" and done.error is None
    assert old() is None  # the frozen old snapshot was freed by reference counting
    assert not tracked(holder.get())  # the new one was frozen by the reload


def test_refreeze_does_nothing_unless_the_process_froze_its_heap(collector_off: None) -> None:
    made = Node()
    heap.refreeze()
    assert tracked(made)
    heap.freeze()
    assert not tracked(made)
    later = Node()
    heap.refreeze()
    assert not tracked(later)
    heap.thaw()
    assert tracked(made) and tracked(later)


def test_refreeze_collects_the_garbage_made_since_the_freeze(collector_off: None) -> None:
    """A cycle dropped after freeze() is collected by the next refreeze(), not frozen with it
    (frozen, it would never be collected)."""
    heap.freeze()
    garbage = dropped_cycle()
    heap.refreeze()
    assert garbage() is None
