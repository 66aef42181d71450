"""RecommendBatch: the real server on port 0, through the real client, against Recommend."""

from __future__ import annotations

import dataclasses
import json
import threading
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from blocking_snapshot import blocking
from prometheus_client import CollectorRegistry

from slimrank.serving.client import BatchRequest, SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.proto.slimrank.v1 import recommender_pb2, recommender_pb2_grpc
from slimrank.serving.server import SlimrankServer, create_server
from slimrank.serving.snapshot import SnapshotHolder, random_snapshot
from slimrank.serving.status import field_violations


@pytest.fixture
def served() -> Iterator[tuple[SlimrankServer, SnapshotHolder, SlimrankClient, int]]:
    holder = SnapshotHolder(random_snapshot("v1", dim=16))
    server, port = create_server(ServerConfig(max_batch=8), holder, CollectorRegistry())
    server.mark_serving()
    client = SlimrankClient(f"127.0.0.1:{port}", timeout=5.0)
    yield server, holder, client, port
    client.close()
    server.shutdown(0).wait(5)


def test_each_answer_is_what_recommend_answers(served) -> None:
    _, _, client, _ = served
    rng = np.random.default_rng(3)
    requests = [
        BatchRequest(f"u{u}", int(rng.integers(1, 20)), exclude=[f"i{u}"]) for u in range(12)
    ]
    requests += [
        BatchRequest("stranger", 9, recent=["i4", "i8", "i15"]),
        BatchRequest("", 5),  # popular items
        BatchRequest("u7", 30, recent=["i1"], exclude=["i2", "i3"]),
    ]
    # 15 requests over pages of 4: four RecommendBatch calls.
    got = client.recommend_batch(requests, page_size=4)
    assert len(got) == len(requests)
    for request, answer in zip(requests, got, strict=True):
        single = client.recommend(
            request.user_id, request.k, recent=request.recent, exclude=request.exclude
        )
        assert answer == single
    assert {a.user_source for a in got} == {"KNOWN", "RECENT", "POPULAR"}


def test_the_batch_is_bounded_and_names_the_bad_request(served) -> None:
    _, _, client, _ = served
    with pytest.raises(grpc.RpcError) as info:
        client.recommend_batch([BatchRequest("u1", 3)] * 9, page_size=9)  # max_batch=8
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "requests: must hold 1 to 8 requests (page longer lists), got 9"
    assert set(field_violations(info.value)) == {"requests"}  # as every INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        client.recommend_batch([BatchRequest("u1", 3), BatchRequest("u2", 0)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("requests[1].k:")
    assert set(field_violations(info.value)) == {"requests[1].k"}  # google.rpc.BadRequest
    with pytest.raises(grpc.RpcError) as info:
        client.recommend_batch([BatchRequest("u1", 3, exclude=[""])])
    assert info.value.details().startswith("requests[0].exclude_item_ids:")
    stub = recommender_pb2_grpc.RecommenderStub(client._channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.RecommendBatch(recommender_pb2.RecommendBatchRequest(), timeout=5)  # empty
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(info.value)) == {"requests"}


def test_a_batch_of_exactly_max_batch_is_answered(served) -> None:
    _, _, client, _ = served
    requests = [BatchRequest(f"u{u}", 3) for u in range(8)]  # max_batch=8
    got = client.recommend_batch(requests, page_size=8)
    assert [a.item_ids for a in got] == [client.recommend(f"u{u}", 3).item_ids for u in range(8)]


def test_a_reload_mid_batch_does_not_mix_two_models() -> None:
    snap, entered, release = blocking(random_snapshot("v1", dim=16))
    holder = SnapshotHolder(snap)
    server, port = create_server(ServerConfig(), holder, CollectorRegistry())
    server.mark_serving()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = recommender_pb2_grpc.RecommenderStub(channel)
    batch = recommender_pb2.RecommendBatchRequest(
        requests=[recommender_pb2.RecommendRequest(user_id=f"u{u}", k=2) for u in range(3)]
    )
    try:
        running = stub.RecommendBatch.future(batch, timeout=10)
        assert entered.acquire(timeout=5)  # the first request is being ranked on v1
        holder.swap(random_snapshot("v2", dim=16, seed=1))
        release.set()
        versions = [r.model_version for r in running.result(timeout=10).responses]
        assert versions == ["v1", "v1", "v1"]
        assert stub.Recommend(batch.requests[0], timeout=5).model_version == "v2"
    finally:
        release.set()
        channel.close()
        server.shutdown(0).wait(5)


def test_a_batch_takes_an_admission_slot_and_is_shed_like_a_call() -> None:
    snap, entered, release = blocking(random_snapshot("v1", dim=16))
    holder = SnapshotHolder(snap)
    config = ServerConfig(max_inflight=1, max_workers=4, handler_threads=1)
    registry = CollectorRegistry()
    server, port = create_server(config, holder, registry)
    server.mark_serving()
    client = SlimrankClient(f"127.0.0.1:{port}", timeout=5.0, retries=0)  # see each refusal
    stub = recommender_pb2_grpc.RecommenderStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    batch = recommender_pb2.RecommendBatchRequest(
        requests=[recommender_pb2.RecommendRequest(user_id="u1", k=2)] * 3
    )
    try:
        running = stub.RecommendBatch.future(batch, timeout=10)
        assert entered.acquire(timeout=5)  # the batch holds the one slot
        with pytest.raises(grpc.RpcError) as info:
            client.recommend("u2", 3)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        assert [len(r.items) for r in running.result(timeout=10).responses] == [2, 2, 2]
        while entered.acquire(blocking=False):  # requests 2 and 3 entered too: not the next call
            pass
        release.clear()  # before the call starts, or it may pass the gate and free the slot
        busy = stub.Recommend.future(recommender_pb2.RecommendRequest(user_id="u1", k=2))
        assert entered.acquire(timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            client.recommend_batch([BatchRequest("u3", 2)])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        busy.result(timeout=10)
        method = "/slimrank.v1.Recommender/RecommendBatch"
        ok = registry.get_sample_value(
            "slimrank_grpc_requests_total", {"method": method, "code": "OK"}
        )
        assert ok == 1
    finally:
        release.set()
        client.close()
        server.shutdown(0).wait(5)


def _held_once(snap):
    """A snapshot whose first scoring after the warm-up call waits for ``release``."""
    entered, release, calls = threading.Event(), threading.Event(), []

    def score(features: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:  # the first call after the warm-up
            entered.set()
            release.wait(10)
        return snap.score(features)

    return dataclasses.replace(snap, score=score), entered, release


def _post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=2.0) as answer:
        return json.loads(answer.read())


@pytest.mark.parametrize("batch_over", ["grpc", "http"])
def test_a_batch_never_holds_the_event_loop_when_calls_run_on_it(batch_over: str) -> None:
    """With model calls on the loop (``--handler-threads 0``, the CLI's default) a batch runs
    on a thread: a Recommend, over gRPC or HTTP, is answered while a batch is held mid-way.
    On the loop it waited for the whole batch (an independent client measured online p99
    at 256 ms, a third refused, beside one batch client)."""
    snap, entered, release = _held_once(random_snapshot("v1", dim=16))
    holder = SnapshotHolder(snap)
    config = ServerConfig(handler_threads=0, http_port=0, max_inflight=4)
    server, port = create_server(config, holder, CollectorRegistry())
    server.mark_serving()
    client = SlimrankClient(f"127.0.0.1:{port}", timeout=5.0, retries=0)
    batch: list = []
    if batch_over == "grpc":
        send = lambda: batch.append(len(client.recommend_batch([BatchRequest("u1", 3)] * 4)))  # noqa: E731
    else:
        body = {"requests": [{"user_id": "u1", "k": 3}] * 4}
        send = lambda: batch.append(  # noqa: E731
            len(_post(server.http_port, "/v1/recommend:batch", body)["responses"])
        )
    worker = threading.Thread(target=send)
    try:
        worker.start()
        assert entered.wait(10)  # the batch is inside its first request's scoring
        assert client.recommend("u2", 3, timeout=2.0).item_ids  # answered meanwhile
        assert (
            len(_post(server.http_port, "/v1/recommend", {"user_id": "u3", "k": 3})["items"]) == 3
        )
    finally:
        release.set()
        worker.join(10)
        client.close()
        server.shutdown(0).wait(5)
    assert batch == [4]


def test_batches_wait_for_one_another_not_admin_calls() -> None:
    """On their own thread (model calls on the loop): a held batch delays neither an Admin
    call nor, over HTTP, a Recommend; the HTTP calls and the batches each have one thread."""
    snap, entered, release = _held_once(random_snapshot("v1", dim=16))
    config = ServerConfig(handler_threads=0, http_port=0, max_inflight=4)
    server, port = create_server(config, SnapshotHolder(snap), CollectorRegistry())
    server.mark_serving()
    client = SlimrankClient(f"127.0.0.1:{port}", timeout=5.0, retries=0)
    worker = threading.Thread(target=lambda: client.recommend_batch([BatchRequest("u1", 3)] * 2))
    names: set[str] = set()
    try:
        worker.start()
        assert entered.wait(10)
        assert client.model_info(timeout=2.0).version == "v1"  # Admin is not behind it
        assert (
            len(_post(server.http_port, "/v1/recommend", {"user_id": "u3", "k": 3})["items"]) == 3
        )
        names = {t.name.rsplit("_", 1)[0] for t in threading.enumerate()}  # started lazily
    finally:
        release.set()
        worker.join(10)
        client.close()
        server.shutdown(0).wait(5)
    assert {"slimrank-batch", "slimrank-http"} <= names
