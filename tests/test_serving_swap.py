"""``replace_snapshot``: the one reload sequence ``Admin.Reload`` and the watcher share.

The reference is the holder itself: what it serves after the call, which snapshots are still
referenced (``weakref``), and the reload counters.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import weakref

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from slimrank.serving.metrics import ServingMetrics
from slimrank.serving.snapshot import ModelSnapshot, SnapshotHolder, random_snapshot
from slimrank.serving.swap import replace_snapshot


def _setup() -> tuple[SnapshotHolder, ServingMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return SnapshotHolder(random_snapshot("v1", seed=1)), ServingMetrics(registry), registry


def _counts(registry: CollectorRegistry) -> tuple[float | None, float | None]:
    return (
        registry.get_sample_value("slimrank_model_reloads_total"),
        registry.get_sample_value("slimrank_model_reload_failures_total"),
    )


def test_a_new_version_is_swapped_in_and_the_old_one_freed() -> None:
    holder, metrics, registry = _setup()
    old = weakref.ref(holder.get())
    done = replace_snapshot(
        holder, threading.Lock(), lambda: random_snapshot("v2", seed=2), metrics, "v2"
    )
    assert (done.previous, done.version, done.loaded, done.error) == ("v1", "v2", True, None)
    assert holder.get().version == "v2"
    assert old() is None  # freed by the reload itself, nothing left holding it
    assert _counts(registry) == (1, 0)


def test_a_failed_load_keeps_the_served_snapshot_counts_and_holds_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    holder, metrics, registry = _setup()
    served = holder.get()

    def load() -> ModelSnapshot:
        raise ValueError("checksum mismatch in items.npy")

    with caplog.at_level(logging.WARNING, logger="slimrank.serving.swap"):
        done = replace_snapshot(holder, threading.Lock(), load, metrics, "v2")
    assert holder.get() is served
    assert done.version is None and done.previous == "v1"
    assert isinstance(done.error, ValueError) and "checksum" in str(done.error)
    # The error the caller gets has no traceback, so no frame of the reload keeps the
    # served snapshot alive after it is replaced later.
    assert done.error.__traceback__ is None
    assert _counts(registry) == (0, 1)
    assert "refused; still serving v1" in caplog.text and "'v2'" in caplog.text
    ref = weakref.ref(served)
    del served
    replace_snapshot(holder, threading.Lock(), lambda: random_snapshot("v3"), metrics, "v3")
    gc.collect()
    assert ref() is None


def test_a_snapshot_that_fails_its_warm_up_is_not_served() -> None:
    holder, metrics, registry = _setup()
    nan = np.float32("nan")
    broken = dataclasses.replace(
        random_snapshot("v2", seed=2), score=lambda f: np.full(len(f), nan, np.float32)
    )  # scores that are not finite: warm_up refuses it
    done = replace_snapshot(holder, threading.Lock(), lambda: broken, metrics, "v2")
    assert done.error is not None and holder.get().version == "v1"
    assert done.loaded is False
    assert _counts(registry) == (0, 1)


def test_skip_answers_without_loading_and_the_same_version_is_not_swapped() -> None:
    holder, metrics, registry = _setup()
    calls: list[str] = []

    def load() -> ModelSnapshot:
        calls.append("load")
        return random_snapshot("v1", seed=9)

    skipped = replace_snapshot(
        holder, threading.Lock(), load, metrics, "v1", skip=lambda served: served == "v1"
    )
    assert (skipped.version, skipped.loaded, calls) == (None, False, [])
    served = holder.get()
    same = replace_snapshot(holder, threading.Lock(), load, metrics, None)
    assert (same.version, same.loaded, calls) == (None, True, ["load"])
    assert holder.get() is served  # a loaded copy of the served version is not swapped in
    assert _counts(registry) == (0, 0)


def test_a_skip_that_raises_is_a_failed_reload() -> None:
    holder, metrics, registry = _setup()

    def skip(served: str) -> bool:
        raise LookupError("no version 'v9' under the root")

    done = replace_snapshot(holder, threading.Lock(), lambda: holder.get(), metrics, "v9", skip)
    assert isinstance(done.error, LookupError) and holder.get().version == "v1"
    assert _counts(registry) == (0, 1)


def test_reloads_are_serialized_by_the_lock_and_marked_as_loading() -> None:
    holder, metrics, _ = _setup()
    lock = threading.Lock()
    seen: list[bool] = []

    def load() -> ModelSnapshot:
        seen.append(holder.loading.active())
        seen.append(lock.locked())
        return random_snapshot("v2", seed=2)

    replace_snapshot(holder, lock, load, metrics, "v2")
    assert seen == [True, True]
    assert not lock.locked()
