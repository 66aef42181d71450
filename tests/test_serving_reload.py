"""Hot reload from a real bundle store into the real server, through the real client."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from slimrank.bundle import BundleError, open_bundle, promote, publish, rollback
from slimrank.errors import IntegrityError
from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.loader import default_loaders, load_flat, load_snapshot, random_flat_bundle
from slimrank.serving.reload import (
    RELOAD_NICE,
    BundleWatcher,
    ReloadConfig,
    bundle_reload_fn,
    load_current,
    run_deprioritized,
)
from slimrank.serving.server import SlimrankServer, create_server
from slimrank.serving.snapshot import ModelSnapshot, SnapshotHolder

DIM = 8
N_ITEMS = 300
N_USERS = 40


def publish_flat(root: Path, prefix: str, seed: int) -> str:
    """Publish a flat bundle whose item ids all start with ``prefix``; return its version."""
    source = random_flat_bundle(prefix, N_ITEMS, N_USERS, DIM, seed)
    return publish(root, source, metrics={"test": {"ndcg@10": 0.25 + seed / 100}}, parent="t1")


def corrupt(root: Path, version: str, name: str = "items.npy") -> None:
    """Flip one byte of a published file (published files are read-only)."""
    path = root / version / name
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@dataclasses.dataclass
class Served:
    root: Path
    server: SlimrankServer
    holder: SnapshotHolder
    registry: CollectorRegistry
    watcher: BundleWatcher
    client: SlimrankClient

    def sample(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """A server over a one-version store, with a watcher that is polled by hand."""
    root = tmp_path / "bundles"
    publish_flat(root, "a", seed=1)
    holder = SnapshotHolder(load_current(root))
    registry = CollectorRegistry()
    lock = threading.Lock()
    load = bundle_reload_fn(root)
    server, port = create_server(ServerConfig(), holder, registry, load, reload_lock=lock)
    server.mark_serving()
    watcher = BundleWatcher(root, holder, load, server.metrics, lock, ReloadConfig(backoff_s=3600))
    client = SlimrankClient(f"127.0.0.1:{port}", timeout=10.0)
    yield Served(root, server, holder, registry, watcher, client)
    watcher.stop()
    client.close()
    server.shutdown(0).wait(5)


def test_flat_loader_round_trips_the_published_arrays(tmp_path: Path) -> None:
    version = publish_flat(tmp_path, "a", seed=3)
    snap = load_snapshot(open_bundle(tmp_path, version))
    rng = np.random.default_rng(3)
    items = rng.standard_normal((N_ITEMS, DIM)).astype(np.float32)
    np.testing.assert_array_equal(snap.item_vectors, items)
    assert snap.version == version and snap.item_ids[7] == "a7" and snap.user_ids[2] == "u2"
    assert snap.metadata.parent_teacher_version == "t1"
    assert snap.metadata.metrics == {"test.ndcg@10": pytest.approx(0.28)}
    assert snap.metadata.created is not None and snap.metadata.created.tzinfo is not None


def test_bundle_without_serving_json_or_with_unknown_kind_is_refused(tmp_path: Path) -> None:
    bare = publish(tmp_path, {"items.npy": b"x"})
    with pytest.raises(BundleError, match=r"serving\.json"):
        load_snapshot(open_bundle(tmp_path, bare))
    odd = publish(tmp_path, {"serving.json": b'{"kind": "exotic"}'})
    with pytest.raises(BundleError, match="exotic"):
        load_snapshot(open_bundle(tmp_path, odd))


def test_extra_loaders_serve_their_own_kind(tmp_path: Path) -> None:
    def write(directory: Path) -> None:
        random_flat_bundle("a", N_ITEMS, N_USERS, DIM, seed=1)(directory)
        (directory / "serving.json").write_text('{"kind": "custom"}')

    version = publish(tmp_path, write)
    with pytest.raises(BundleError, match="custom"):
        load_current(tmp_path)
    loaders = {**default_loaders(), "custom": load_flat}
    assert load_current(tmp_path, loaders).version == version


def test_watcher_swaps_in_a_new_current_bundle(served: Served) -> None:
    v1 = served.holder.get().version
    assert served.client.recommend("u1", 5).model_version == v1
    assert not served.watcher.poll_once()  # CURRENT unchanged
    v2 = publish_flat(served.root, "b", seed=2)
    assert served.watcher.poll_once()
    got = served.client.recommend("u1", 5)
    assert got.model_version == v2 and all(i.startswith("b") for i in got.item_ids)
    assert served.client.model_info().metrics == {"test.ndcg@10": pytest.approx(0.27)}
    assert served.sample("slimrank_model_reloads_total") == 1
    assert served.sample("slimrank_model_reload_failures_total") == 0


def test_reload_under_load_drops_no_call_and_never_mixes_versions(served: Served) -> None:
    v1 = served.holder.get().version
    v2 = publish_flat(served.root, "b", seed=2)
    prefixes = {v1: "a", v2: "b"}
    stop = threading.Event()
    seen: list[tuple[str, tuple[str, ...]]] = []
    errors: list[BaseException] = []
    target = served.client.target

    def call_continuously(worker: int) -> None:
        with SlimrankClient(target, timeout=10.0, retries=0) as client:
            n = 0
            while not stop.is_set() or n < 5:
                try:
                    got = client.recommend(f"u{(worker * 7 + n) % N_USERS}", 10)
                except grpc.RpcError as err:
                    errors.append(err)
                    return
                seen.append((got.model_version, got.item_ids))
                n += 1

    threads = [threading.Thread(target=call_continuously, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    while len(seen) < 20:  # every thread is calling before the swap
        time.sleep(0.01)
    assert served.watcher.poll_once()
    after_swap = len(seen)
    while len(seen) < after_swap + 20:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(30)
    assert errors == []
    versions = [v for v, _ in seen]
    assert set(versions) == {v1, v2}
    assert versions[-1] == v2
    for version, items in seen:
        assert len(items) == 10 and all(i.startswith(prefixes[version]) for i in items)


def test_corrupt_bundle_keeps_the_old_one_and_counts_a_failure(served: Served) -> None:
    v1 = served.holder.get().version
    v2 = publish_flat(served.root, "b", seed=2)
    corrupt(served.root, v2)
    assert not served.watcher.poll_once()
    assert served.client.recommend("u1", 3).model_version == v1
    assert served.sample("slimrank_model_reload_failures_total") == 1
    # No retry of the same CURRENT before the back-off ...
    assert not served.watcher.poll_once()
    assert served.sample("slimrank_model_reload_failures_total") == 1
    # ... but a new CURRENT is tried at once.
    v3 = publish_flat(served.root, "c", seed=3)
    assert served.watcher.poll_once()
    assert served.client.recommend("u1", 3).model_version == v3


def test_failed_version_is_retried_after_the_back_off(tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    v1 = publish_flat(root, "a", seed=1)
    holder = SnapshotHolder(load_current(root))
    now = [0.0]
    registry = CollectorRegistry()
    server, _ = create_server(ServerConfig(), holder, registry)
    try:
        watcher = BundleWatcher(
            root,
            holder,
            bundle_reload_fn(root),
            server.metrics,
            threading.Lock(),
            ReloadConfig(backoff_s=10.0),
            clock=lambda: now[0],
        )
        v2 = publish_flat(root, "b", seed=2)
        corrupt(root, v2)
        assert not watcher.poll_once()
        now[0] = 9.0
        assert not watcher.poll_once()
        assert registry.get_sample_value("slimrank_model_reload_failures_total") == 1
        now[0] = 10.5
        assert not watcher.poll_once()  # retried, and still corrupt
        assert registry.get_sample_value("slimrank_model_reload_failures_total") == 2
        assert holder.get().version == v1
    finally:
        server.shutdown(0).wait(5)


def test_promote_and_rollback_are_picked_up(served: Served) -> None:
    v1 = served.holder.get().version
    v2 = publish_flat(served.root, "b", seed=2)
    assert served.watcher.poll_once()
    rollback(served.root)
    assert served.watcher.poll_once()
    assert served.client.recommend("u1", 3).model_version == v1
    promote(served.root, v2)
    assert served.watcher.poll_once()
    assert served.client.recommend("u1", 3).model_version == v2


def test_watcher_thread_follows_current(served: Served) -> None:
    fast = BundleWatcher(
        served.root,
        served.holder,
        bundle_reload_fn(served.root),
        served.server.metrics,
        threading.Lock(),
        ReloadConfig(poll_interval_s=0.02),
    )
    fast.start()
    try:
        v2 = publish_flat(served.root, "b", seed=2)
        deadline = time.monotonic() + 30
        while served.holder.get().version != v2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert served.client.recommend("u1", 3).model_version == v2
    finally:
        fast.stop()


def test_admin_reload_loads_a_named_version_and_refuses_a_corrupt_one(served: Served) -> None:
    v1 = served.holder.get().version
    v2 = publish_flat(served.root, "b", seed=2)
    result = served.client.reload()
    assert result.reloaded and (result.previous_version, result.version) == (v1, v2)
    assert not served.watcher.poll_once()  # sees CURRENT = v2, already served
    assert served.client.reload(v1).version == v1
    # An operator's pin holds while CURRENT stays where it was.
    assert not served.watcher.poll_once()
    assert served.holder.get().version == v1
    corrupt(served.root, v2, "serving.json")
    with pytest.raises(grpc.RpcError) as err:
        served.client.reload(v2)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert served.client.recommend("u1", 3).model_version == v1
    assert served.sample("slimrank_model_reload_failures_total") == 1


def test_load_current_refuses_a_corrupt_current(tmp_path: Path) -> None:
    version = publish_flat(tmp_path, "a", seed=1)
    corrupt(tmp_path, version, "user_vectors.npy")
    with pytest.raises(IntegrityError, match=r"user_vectors\.npy"):
        load_current(tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "CURRENT",
        "v1\x00",
        "v000001-20260101T000000Z\nforged",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: int() reads it as 1, but it is no sequence number
        "v999999-20990101T000000Z",  # well formed, not in the store
        "999999",
    ],
)
def test_a_bad_version_name_is_refused_with_one_warning_line(
    served: Served, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    served_version = served.holder.get().version
    with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError) as err:
        served.client.reload(name)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # no published version has the name
    assert repr(name) in err.value.details()
    assert served.holder.get().version == served_version
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    line = warnings[0].getMessage()
    assert "\n" not in line and "\x00" not in line and repr(name) in line


def test_reloading_the_served_version_answers_without_loading_it(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    v1 = served.holder.get().version
    snapshot = served.holder.get()
    sequence = str(int(v1[1:7]))
    for name in (None, v1, sequence):  # CURRENT, the full name, the sequence number
        with caplog.at_level(logging.INFO):
            result = served.client.reload(name)
        assert not result.reloaded and result.version == result.previous_version == v1
        assert "not loaded again" in result.message
    assert not [r for r in caplog.records if r.name == "slimrank.serving.loader"]
    assert served.holder.get() is snapshot
    assert served.sample("slimrank_model_reloads_total") == 0
    assert served.sample("slimrank_model_reload_failures_total") == 0


def test_current_naming_a_symlink_to_outside_the_store_is_refused(
    served: Served, tmp_path: Path
) -> None:
    v1 = served.holder.get().version
    outside = tmp_path / "outside"
    publish_flat(outside, "b", seed=2)
    v2 = publish_flat(outside, "c", seed=3)  # sequence 2 there, a free name in the store
    os.symlink(outside / v2, served.root / v2)
    (served.root / "CURRENT").write_text(f"{v2}\n")
    with pytest.raises(grpc.RpcError) as err:
        served.client.reload()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not a published version" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        served.client.reload(v2)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # a link is not a published version
    assert not served.watcher.poll_once()
    assert served.client.recommend("u1", 3).model_version == v1
    with pytest.raises(IntegrityError, match="not a published version"):
        load_current(served.root)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_a_reload_loads_on_a_thread_below_the_servers_priority(tmp_path: Path) -> None:
    """The load runs niced on its own thread and gives back its snapshot; the calling thread's
    priority is left as it was, and a load that fails raises in the caller."""
    version = publish_flat(tmp_path, "i", 0)
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int] = {}

    def load() -> str:
        seen["tid"] = threading.get_native_id()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, seen["tid"])
        return load_snapshot(open_bundle(tmp_path, version)).version

    assert run_deprioritized(load, RELOAD_NICE) == version
    assert seen["tid"] != threading.get_native_id()
    assert seen["nice"] == min(19, caller + RELOAD_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller

    corrupt(tmp_path, version)
    with pytest.raises(IntegrityError, match=r"items\.npy"):
        run_deprioritized(lambda: open_bundle(tmp_path, version), RELOAD_NICE)
    with pytest.raises(IntegrityError, match=r"items\.npy"):
        bundle_reload_fn(tmp_path)(version)


def test_the_reload_frees_the_old_snapshot_after_the_calls_still_on_it(tmp_path: Path) -> None:
    """A call still running on the old snapshot at the swap finishes on it, and the reload
    then frees it on its own thread; before, the last call to finish freed it (in the server,
    on the event loop: ~2 GiB of arrays at 1M)."""
    v1 = publish_flat(tmp_path, "a", seed=1)
    holder = SnapshotHolder(load_current(tmp_path))
    registry = CollectorRegistry()
    server, _ = create_server(ServerConfig(), holder, registry)
    try:
        watcher = BundleWatcher(
            tmp_path, holder, bundle_reload_fn(tmp_path), server.metrics, threading.Lock()
        )
        freed_on: list[str] = []
        weakref.finalize(holder.get(), lambda: freed_on.append(threading.current_thread().name))
        in_call, finish = threading.Event(), threading.Event()
        answered: list[str] = []

        def call() -> None:  # what a call on the event loop holds while it runs
            snapshot = holder.get()
            in_call.set()
            finish.wait()
            answered.append(snapshot.user_query("u1", []).source.name)
            del snapshot

        caller = threading.Thread(target=call, name="call")
        caller.start()
        in_call.wait()
        v2 = publish_flat(tmp_path, "b", seed=2)
        reloaded: list[bool] = []
        reloader = threading.Thread(target=lambda: reloaded.append(watcher.poll_once()))
        reloader.name = "reload"
        reloader.start()
        while holder.get().version == v1 and reloader.is_alive():
            time.sleep(0.005)
        assert holder.get().version == v2
        assert not freed_on  # the call still holds it
        finish.set()
        caller.join()
        reloader.join()
        assert reloaded == [True]
        assert answered == ["KNOWN"]
        assert freed_on == ["reload"]
    finally:
        server.shutdown(0).wait(5)


def test_a_polled_reload_marks_the_holder_as_loading_for_admission(served: Served) -> None:
    """The watcher's reload, not only Admin.Reload, runs as a load that admission sees (it
    lets the load's queue wait, slimrank.serving.admission.LoadActivity)."""
    seen: list[bool] = []
    load = bundle_reload_fn(served.root)

    def watched_load(version: str | None) -> ModelSnapshot:
        seen.append(served.holder.loading.active())
        return load(version)

    watcher = BundleWatcher(
        served.root, served.holder, watched_load, served.server.metrics, threading.Lock()
    )
    version = publish_flat(served.root, "b", seed=2)
    promote(served.root, version)
    assert not served.holder.loading.active()
    assert watcher.poll_once() and served.holder.get().version == version
    assert seen == [True]
    assert served.holder.loading.active()  # its tail: the queue it left is worked off
