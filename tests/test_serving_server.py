"""The real gRPC server on port 0, through the real client, over real small snapshots."""

from __future__ import annotations

import dataclasses
import math
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from blocking_snapshot import blocking
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from registry_samples import sample_sum

from slimrank.errors import IntegrityError
from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.proto.slimrank.v1 import recommender_pb2, recommender_pb2_grpc
from slimrank.serving.server import SlimrankServer, create_server
from slimrank.serving.snapshot import ModelSnapshot, SnapshotHolder, random_snapshot

DIM = 16
RECOMMEND = "/slimrank.v1.Recommender/Recommend"


@dataclasses.dataclass
class Running:
    server: SlimrankServer
    port: int
    holder: SnapshotHolder
    registry: CollectorRegistry
    client: SlimrankClient

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return sample_sum(self.registry, name, labels)


@pytest.fixture
def start() -> Iterator[Callable[..., Running]]:
    """Start servers on port 0 (marked SERVING); all are stopped after the test."""
    running: list[Running] = []

    def _start(
        snapshot: ModelSnapshot | None = None,
        config: ServerConfig | None = None,
        reload_fn: Callable[[str | None], ModelSnapshot] | None = None,
        serving: bool = True,
    ) -> Running:
        holder = SnapshotHolder(snapshot or random_snapshot("v1", dim=DIM))
        registry = CollectorRegistry()
        server, port = create_server(config or ServerConfig(), holder, registry, reload_fn)
        if serving:
            server.mark_serving()
        client = SlimrankClient(f"127.0.0.1:{port}", timeout=5.0)
        running.append(Running(server, port, holder, registry, client))
        return running[-1]

    yield _start
    for r in running:
        r.client.close()
        r.server.shutdown(0).wait(5)


def reference(
    snap: ModelSnapshot, vector: np.ndarray, drop_ids: list[str], k: int, n: int = 200
) -> tuple[list[str], np.ndarray]:
    """Retrieve + rank by brute force in numpy, independent of FAISS and of the servicer."""
    dots = snap.item_vectors @ vector  # (n_items,)
    order = np.argsort(-dots, kind="stable")
    order = [i for i in order if snap.item_ids[i] not in drop_ids][:n]
    scores = dots[order] + 0.1 * np.log1p(snap.popularity[order])
    best = np.argsort(-scores, kind="stable")[:k]
    return [str(snap.item_ids[order[i]]) for i in best], scores[best]


def test_known_user_matches_direct_retrieve_and_rank(start: Callable[..., Running]) -> None:
    r = start()
    snap = r.holder.get()
    got = r.client.recommend("u5", 10, exclude=["i3", "i77"])
    ids, scores = reference(snap, snap.user_vectors[5], ["i3", "i77"], 10)
    assert got.item_ids == tuple(ids)
    np.testing.assert_allclose(got.scores, scores, rtol=1e-5)
    assert got.model_version == "v1" and got.user_source == "KNOWN" and got.candidates == 200


def test_unknown_user_with_recent_items_pools_them(start: Callable[..., Running]) -> None:
    r = start()
    snap = r.holder.get()
    recent = ["i10", "i20", "i30"]
    got = r.client.recommend("newcomer", 5, recent=[*recent, "not-an-item"])
    pooled = snap.item_vectors[[10, 20, 30]].mean(axis=0)
    ids, _ = reference(snap, pooled, recent, 5)
    assert got.item_ids == tuple(ids) and got.user_source == "RECENT"
    assert not set(got.item_ids) & set(recent)


def test_unknown_user_without_history_gets_popular(start: Callable[..., Running]) -> None:
    r = start()
    snap = r.holder.get()
    top = [str(snap.item_ids[i]) for i in snap.popular_order[:6]]
    got = r.client.recommend("", 5, exclude=[top[0]])
    assert got.item_ids == tuple(top[1:6]) and got.user_source == "POPULAR"
    np.testing.assert_allclose(got.scores, snap.popularity[snap.popular_order[1:6]])


def test_search_matches_direct(start: Callable[..., Running]) -> None:
    r = start()
    snap = r.holder.get()
    vector = np.random.default_rng(9).standard_normal(DIM).astype(np.float32)
    got = r.client.search(vector.tolist(), 7, exclude=["i1"])
    ids, scores = reference(snap, vector, ["i1"], 7)
    assert got.item_ids == tuple(ids) and got.model_version == "v1"
    np.testing.assert_allclose(got.scores, scores, rtol=1e-5)


INVALID = [
    ("recommend", {"user_id": "u1", "k": 0}, "k"),
    ("recommend", {"user_id": "u1", "k": 101}, "k"),
    ("recommend", {"user_id": "u1", "k": 5, "exclude": ["i1"] * 11}, "exclude_item_ids"),
    ("recommend", {"user_id": "u1", "k": 5, "recent": ["i1", ""]}, "recent_item_ids"),
    ("recommend", {"user_id": "u" * 300, "k": 5}, "user_id"),
    ("search", {"vector": [0.1] * (DIM - 1), "k": 5}, "query_vector"),
    ("search", {"vector": [math.nan] + [0.1] * (DIM - 1), "k": 5}, "query_vector"),
    ("search", {"vector": [math.inf] + [0.1] * (DIM - 1), "k": 5}, "query_vector"),
    ("search", {"vector": [0.1] * DIM, "k": -3}, "k"),
]


def test_validation_errors_are_invalid_argument_naming_the_field(
    start: Callable[..., Running],
) -> None:
    r = start(config=ServerConfig(max_exclude=10))
    for method, kwargs, field in INVALID:
        with pytest.raises(grpc.RpcError) as info:
            getattr(r.client, method)(**kwargs)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, kwargs)
        assert info.value.details().startswith(f"{field}: "), info.value.details()
    invalid = r.sample(
        "slimrank_grpc_requests_total", {"method": RECOMMEND, "code": "INVALID_ARGUMENT"}
    )
    assert invalid == 5


def test_the_documented_limits_are_accepted_and_one_past_them_refused(
    start: Callable[..., Running],
) -> None:
    """README: k in [1, 100]; id lists hold at most 1,000 ids of at most 256 characters."""
    r = start()
    longest = "x" * 256
    ids = [f"{i:0256d}" for i in range(1000)]  # 1,000 distinct ids, none an item's
    got = r.client.recommend(longest, 100, recent=ids, exclude=ids)
    assert len(got.item_ids) == 100 and got.user_source == "POPULAR"
    too_long, too_many = longest + "x", [*ids, "i1"]
    for kwargs, field in [
        ({"user_id": too_long}, "user_id"),
        ({"user_id": "u1", "recent": [too_long]}, "recent_item_ids"),
        ({"user_id": "u1", "exclude": [too_long]}, "exclude_item_ids"),
        ({"user_id": "u1", "recent": too_many}, "recent_item_ids"),
        ({"user_id": "u1", "exclude": too_many}, "exclude_item_ids"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            r.client.recommend(k=5, **kwargs)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert info.value.details().startswith(f"{field}: "), info.value.details()


def test_message_size_limit(start: Callable[..., Running]) -> None:
    r = start(config=ServerConfig(max_message_bytes=4096))
    with pytest.raises(grpc.RpcError) as info:
        r.client.search([0.5] * 2000, 5)  # 8 kB of floats
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_reached_during_retrieval_skips_ranking(start: Callable[..., Running]) -> None:
    base = random_snapshot("v1", dim=DIM)
    ranked = []

    def slow_retrieve(queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(0.3)
        return base.search(queries, n)

    def counting_score(features: np.ndarray) -> np.ndarray:
        ranked.append(len(features))
        return base.score(features)

    slow = dataclasses.replace(base, search=slow_retrieve, score=counting_score)
    r = start(slow)
    ranked.clear()  # the warm-up
    with pytest.raises(grpc.RpcError) as info:
        r.client.recommend("u1", 5, timeout=0.1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    labels = {"method": RECOMMEND, "code": "DEADLINE_EXCEEDED"}
    for _ in range(100):  # the server notices after its retrieval step ends
        if r.sample("slimrank_grpc_requests_total", labels):
            break
        time.sleep(0.02)
    assert r.sample("slimrank_grpc_requests_total", labels) == 1
    assert ranked == []
    assert r.client.recommend("u1", 5).item_ids  # a call with time to spare is ranked
    assert ranked == [200]


def test_calls_beyond_max_inflight_are_shed_at_once(start: Callable[..., Running]) -> None:
    snap, entered, release = blocking(random_snapshot("v1", dim=DIM))
    # Two handler threads, so that both admitted calls are inside the model at once.
    r = start(snap, ServerConfig(max_inflight=2, max_workers=4, handler_threads=2))
    stub = recommender_pb2_grpc.RecommenderStub(grpc.insecure_channel(f"127.0.0.1:{r.port}"))
    request = recommender_pb2.RecommendRequest(user_id="u1", k=3)
    busy = [stub.Recommend.future(request, timeout=10) for _ in range(2)]
    try:
        for _ in busy:
            assert entered.acquire(timeout=5)
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:  # the bare stub: the client would retry
            stub.Recommend(recommender_pb2.RecommendRequest(user_id="u2", k=3), timeout=10)
        shed_after = time.perf_counter() - t0
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert shed_after < 0.5
        assert r.client.health() == "SERVING"  # health and admin are not bounded
        assert r.client.model_info().version == "v1"
        assert r.sample("slimrank_inflight_requests") == 2
    finally:
        release.set()
    assert all(len(f.result(timeout=5).items) == 3 for f in busy)
    assert r.sample("slimrank_shed_requests_total", {"reason": "in_progress"}) == 1
    assert r.sample("slimrank_shed_requests_total") == 1  # and no other reason
    shed = {"method": RECOMMEND, "code": "RESOURCE_EXHAUSTED"}
    assert r.sample("slimrank_grpc_requests_total", shed) == 1
    assert r.sample("slimrank_grpc_requests_total", {"method": RECOMMEND, "code": "OK"}) == 2
    assert len(r.client.recommend("u2", 3).item_ids) == 3  # slots were given back


def test_health_transitions(start: Callable[..., Running]) -> None:
    r = start(serving=False)
    assert r.client.health() == "NOT_SERVING"
    assert r.client.health("slimrank.v1.Recommender") == "NOT_SERVING"
    r.server.mark_serving()
    assert r.client.health() == "SERVING"
    assert r.client.health("slimrank.v1.Admin") == "SERVING"
    with pytest.raises(grpc.RpcError) as info:
        r.client.health("no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    channel = grpc.insecure_channel(f"127.0.0.1:{r.port}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stopped = r.server.shutdown(grace=2)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    assert stopped.wait(5)
    channel.close()


def test_graceful_shutdown_lets_in_flight_call_finish(start: Callable[..., Running]) -> None:
    snap, entered, release = blocking(random_snapshot("v1", dim=DIM))
    r = start(snap)
    result: dict[str, object] = {}

    def call() -> None:
        result["ranked"] = r.client.recommend("u1", 4)

    caller = threading.Thread(target=call)
    caller.start()
    assert entered.acquire(timeout=5)
    stopped = r.server.shutdown(grace=30)
    for _ in range(3):  # new calls are refused during the grace period, each one alike
        late = SlimrankClient(f"127.0.0.1:{r.port}", timeout=1.0, retries=0)
        with pytest.raises(grpc.RpcError) as info:
            late.recommend("u2", 4)
        late.close()
        # Refused by the server's code (UNAVAILABLE, which clients retry), not cancelled by
        # gRPC's core racing its stop (CANCELLED, which they do not).
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (info.value.details() or "")
    assert not stopped.is_set()
    assert (
        r.registry.get_sample_value(
            "slimrank_grpc_requests_total", {"method": RECOMMEND, "code": "UNAVAILABLE"}
        )
        == 3
    )
    release.set()
    caller.join(5)
    assert stopped.wait(5)  # as soon as the call in progress finished, not after the grace
    assert result["ranked"].item_ids and result["ranked"].model_version == "v1"  # type: ignore[attr-defined]


def test_swap_under_load_fails_no_call(start: Callable[..., Running]) -> None:
    v1, v2 = random_snapshot("v1", dim=DIM, seed=0), random_snapshot("v2", dim=DIM, seed=1)
    r = start(v1)
    stop = threading.Event()
    versions: list[str] = []
    errors: list[BaseException] = []

    def hammer(user: str) -> None:
        with SlimrankClient(f"127.0.0.1:{r.port}", timeout=5.0, retries=0) as client:
            while not stop.is_set():
                try:
                    versions.append(client.recommend(user, 10).model_version)
                except grpc.RpcError as error:
                    errors.append(error)

    threads = [threading.Thread(target=hammer, args=(f"u{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for i in range(40):
        r.holder.swap(v2 if i % 2 == 0 else v1)
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert set(versions) == {"v1", "v2"} and len(versions) > 40
    assert r.sample("slimrank_model_info", {"version": "v1"}) == 1  # 40 swaps: back on v1
    assert r.sample("slimrank_model_info", {"version": "v2"}) == 0


def test_reload_swaps_and_failures_keep_the_served_model(start: Callable[..., Running]) -> None:
    good = {"v2": random_snapshot("v2", dim=DIM, seed=2)}

    def load(version: str | None) -> ModelSnapshot:
        version = version or "v2"
        if version == "corrupt":
            raise IntegrityError("model.onnx: sha256 mismatch")
        if version == "nan":
            bad = random_snapshot("nan", dim=DIM)
            return dataclasses.replace(bad, score=lambda f: np.full(len(f), np.nan, np.float32))
        return good[version]  # KeyError: no such bundle

    r = start(reload_fn=load)
    for version, code in [
        ("corrupt", grpc.StatusCode.FAILED_PRECONDITION),
        ("nan", grpc.StatusCode.FAILED_PRECONDITION),
        ("v9", grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            r.client.reload(version)
        assert info.value.code() == code
        assert "still serving v1" in info.value.details()
        assert r.client.recommend("u1", 3).model_version == "v1"
    assert r.sample("slimrank_model_reload_failures_total") == 3
    assert r.sample("slimrank_model_reloads_total") == 0

    before = r.client.model_info()
    result = r.client.reload()
    assert (result.version, result.previous_version, result.reloaded) == ("v2", "v1", True)
    assert r.client.recommend("u1", 3).model_version == "v2"
    after = r.client.model_info()
    assert after.version == "v2" and after.loaded_at > before.loaded_at
    assert r.sample("slimrank_model_reloads_total") == 1
    assert r.sample("slimrank_model_info", {"version": "v2"}) == 1
    # One series per served version only: the old label is dropped, not left at 0.
    assert r.registry.get_sample_value("slimrank_model_info", {"version": "v1"}) is None
    # The dashboard's CPU and memory panels read the process collector.
    assert r.sample("process_resident_memory_bytes") > 0

    again = r.client.reload("v2")
    assert not again.reloaded and again.message == "already serving v2"


def test_reload_without_a_bundle_source_is_refused(start: Callable[..., Running]) -> None:
    r = start()
    with pytest.raises(grpc.RpcError) as info:
        r.client.reload()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_model_info(start: Callable[..., Running]) -> None:
    r = start()
    info = r.client.model_info()
    assert (info.version, info.n_items, info.dim) == ("v1", 500, DIM)
    assert info.parent_teacher_version == "teacher-random" and info.metrics == {"seed": 0.0}
    assert info.created is not None and info.created.year == 2026
    assert info.loaded_at is not None


def test_metrics_endpoint_exposes_counts(start: Callable[..., Running]) -> None:
    r = start(config=ServerConfig(metrics_port=0))
    assert r.server.metrics_port
    for user in ("u1", "u2", ""):
        r.client.recommend(user, 5)
    r.client.search([0.1] * DIM, 5)
    url = f"http://127.0.0.1:{r.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("slimrank_grpc_requests_total", method=RECOMMEND, code="OK") == 3
    assert value("slimrank_grpc_request_duration_seconds_count", method=RECOMMEND) == 3
    assert value("slimrank_stage_duration_seconds_count", stage="retrieve") == 4
    assert value("slimrank_stage_duration_seconds_count", stage="rank") == 3  # not the popular one
    assert value("slimrank_stage_duration_seconds_count", stage="features") == 3
    assert value("slimrank_stage_duration_seconds_count", stage="queue") == 4
    assert value("slimrank_candidates_per_request_count") == 4
    assert value("slimrank_index_items") == 500
    assert value("slimrank_model_info", version="v1") == 1
    assert value("slimrank_inflight_requests") == 0
    for reason in ("in_progress", "total", "wait"):  # every reason's series from the start
        assert value("slimrank_shed_requests_total", reason=reason) == 0
    assert (
        "slimrank_grpc_request_duration_seconds_bucket",
        (("le", "0.0005"), ("method", RECOMMEND)),
    ) in samples


def test_reflection_only_when_enabled(start: Callable[..., Running]) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    on = start(config=ServerConfig(reflection=True))
    with grpc.insecure_channel(f"127.0.0.1:{on.port}") as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"slimrank.v1.Recommender", "slimrank.v1.Admin", "grpc.health.v1.Health"} <= services

    off = start()
    with (
        grpc.insecure_channel(f"127.0.0.1:{off.port}") as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_client_retries_unavailable_then_succeeds(start: Callable[..., Running]) -> None:
    import socket

    with socket.socket() as s:  # a free port, for a server that starts late
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # gRPC's retry policy: up to 4 retries, jittered delays up to 0.5, 1, 1, 1 s.
    client = SlimrankClient(f"127.0.0.1:{port}", timeout=10.0, retries=4, backoff=0.5)
    late: list[Running] = []
    starter = threading.Timer(0.2, lambda: late.append(start(config=ServerConfig(port=port))))
    starter.start()
    try:
        assert client.recommend("u1", 3).model_version == "v1"
    finally:
        starter.join()
        client.close()
    none = SlimrankClient("127.0.0.1:1", timeout=0.5, retries=0)
    with pytest.raises(grpc.RpcError) as info:
        none.health()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    none.close()


SERVE_SCRIPT = """
import os, signal, sys, threading, time
from prometheus_client import CollectorRegistry
from slimrank.serving.config import ServerConfig
from slimrank.serving.server import serve_forever
from slimrank.serving.snapshot import SnapshotHolder, random_snapshot

serve_forever(
    ServerConfig(grace_s=5),
    SnapshotHolder(random_snapshot("v1")),
    CollectorRegistry(),
    on_ready=lambda server, port: print(port, flush=True),
    after_stop=signal.SIG_IGN if "ignore" in sys.argv else None,
)
# grpc.aio's server is released after this returns; a loop still polling its completion
# queue then raced the socket's close ("Bad file descriptor" at a worker's exit).
loops = [t.name for t in threading.enumerate() if t.name == "slimrank-aio"]
print("stopped", *loops, flush=True)
if "late" in sys.argv:
    os.kill(os.getpid(), signal.SIGTERM)  # as a worker's parent forwards its own, late
    time.sleep(0.5)
    print("survived", flush=True)
"""


def stopped_by_sigterm(
    *args: str, while_serving: Callable[[int], None] | None = None
) -> tuple[int, str, str]:
    """Run :data:`SERVE_SCRIPT` with ``args``, call ``while_serving(port)`` once it serves,
    SIGTERM it; return its exit code, stdout and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        if while_serving is not None:
            while_serving(port)
        proc.send_signal(signal.SIGTERM)
        # Generous: no call is in flight, so it stops at once on a quiet machine; on a loaded
        # CI machine the interpreter's exit alone has taken seconds.
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, out, err


def test_serve_forever_stops_gracefully_on_sigterm() -> None:
    def calls(port: int) -> None:
        with SlimrankClient(f"127.0.0.1:{port}", timeout=5.0) as client:
            assert client.health() == "SERVING"
            assert client.recommend("u1", 3).model_version == "v1"

    code, out, err = stopped_by_sigterm(while_serving=calls)
    assert code == 0 and out.strip() == "stopped", (out, err)
    assert "Traceback" not in err, err


@pytest.mark.parametrize("after_stop", ["ignore", "default"])
def test_a_signal_after_the_stop_is_ignored_when_asked(after_stop: str) -> None:
    """A ``--workers`` worker passes ``SIG_IGN``: its parent's forwarded SIGTERM can arrive
    after the worker has drained, and with the default handler back it killed the worker.
    The reference (default handlers put back) dies of it, so the test would notice."""
    code, out, err = stopped_by_sigterm(after_stop, "late")
    if after_stop == "ignore":
        assert code == 0 and out.split() == ["stopped", "survived"], (out, err)
    else:
        assert code == -signal.SIGTERM and "survived" not in out, (out, err)


@pytest.fixture(scope="module")
def shared() -> Iterator[Running]:
    holder = SnapshotHolder(random_snapshot("v1", n_items=120, dim=DIM, seed=5))
    registry = CollectorRegistry()
    server, port = create_server(ServerConfig(max_k=50, n_candidates=60), holder, registry)
    server.mark_serving()
    client = SlimrankClient(f"127.0.0.1:{port}", timeout=5.0)
    yield Running(server, port, holder, registry, client)
    client.close()
    server.shutdown(0).wait(5)


ITEM_IDS = st.sampled_from([f"i{i}" for i in range(130)])  # includes ids the model lacks


@settings(max_examples=60, deadline=None)
@given(
    user=st.sampled_from(["", "u3", "u50", "stranger"]),
    k=st.integers(1, 50),
    recent=st.lists(ITEM_IDS, max_size=8),
    exclude=st.lists(ITEM_IDS, max_size=100),
)
def test_recommend_never_returns_excluded_or_seen_and_is_sorted(
    shared: Running, user: str, k: int, recent: list[str], exclude: list[str]
) -> None:
    got = shared.client.recommend(user, k, recent=recent, exclude=exclude)
    known = set(shared.holder.get().item_row)
    assert not set(got.item_ids) & (set(recent) | set(exclude))
    assert len(set(got.item_ids)) == len(got.item_ids) and set(got.item_ids) <= known
    available = len(known - set(recent) - set(exclude))
    assert len(got.item_ids) == min(k, available, 60)
    assert list(got.scores) == sorted(got.scores, reverse=True)


def test_a_failing_ranker_answers_internal_without_details(start: Callable[..., Running]) -> None:
    base = random_snapshot("v1", dim=DIM)
    calls = []

    def flaky(features: np.ndarray) -> np.ndarray:
        calls.append(len(features))
        if len(calls) == 2:  # the first call is the warm-up
            raise RuntimeError("onnxruntime: secret internal path /models/x")
        return base.score(features)

    r = start(dataclasses.replace(base, score=flaky))
    with pytest.raises(grpc.RpcError) as info:
        r.client.recommend("u1", 3)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in info.value.details()
    assert r.client.recommend("u1", 3).model_version == "v1"
    labels = {"method": RECOMMEND, "code": "INTERNAL"}
    assert r.sample("slimrank_grpc_requests_total", labels) == 1


def test_queue_stage_measures_the_wait_for_a_handler_thread(start: Callable[..., Running]) -> None:
    snap, entered, release = blocking(random_snapshot("v1", dim=DIM))
    # One handler thread, two calls admitted: the second waits for the thread, a third is
    # refused at once rather than queued.
    r = start(snap, ServerConfig(max_inflight=2, handler_threads=1))
    pool = futures.ThreadPoolExecutor(2)
    first = pool.submit(r.client.recommend, "u1", 3)
    assert entered.acquire(timeout=5)
    queued = pool.submit(r.client.recommend, "u2", 3)
    time.sleep(0.4)
    assert not queued.done()
    with pytest.raises(grpc.RpcError) as info:
        r.client.recommend("u3", 3)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    release.set()
    assert first.result(timeout=5).model_version == "v1"
    assert queued.result(timeout=5).model_version == "v1"
    pool.shutdown()
    waited = r.sample("slimrank_stage_duration_seconds_count", {"stage": "queue"}) - r.sample(
        "slimrank_stage_duration_seconds_bucket", {"stage": "queue", "le": "0.25"}
    )
    assert waited == 1  # only the queued call waited more than 0.25 s
