"""The Python client's retries, against the real server: gRPC's retry policy, one deadline.

The server here answers Recommend with scripted status codes (a Recommender servicer built
through ``create_server``'s factory), and counts the attempts it saw.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from slimrank.serving.client import SlimrankClient, service_config
from slimrank.serving.config import ServerConfig
from slimrank.serving.proto.slimrank.v1 import recommender_pb2, recommender_pb2_grpc
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import SnapshotHolder, random_snapshot


class Scripted(recommender_pb2_grpc.RecommenderServicer):
    """Answers each Recommend with the next scripted code (then OK), after ``hold_s``."""

    def __init__(self, codes: list[grpc.StatusCode], hold_s: float = 0.0) -> None:
        self.codes = list(codes)
        self.hold_s = hold_s
        self.attempts = 0
        self.lock = threading.Lock()
        self.never = threading.Event()

    def Recommend(self, request, context):
        with self.lock:
            self.attempts += 1
            code = self.codes.pop(0) if self.codes else grpc.StatusCode.OK
        self.never.wait(self.hold_s)  # the server's time on this attempt
        if code != grpc.StatusCode.OK:
            context.abort(code, f"scripted {code.name}")
        return recommender_pb2.RecommendResponse(model_version="scripted")


@pytest.fixture
def serve() -> Iterator[Callable[[Scripted], int]]:
    servers = []

    def _serve(servicer: Scripted) -> int:
        holder = SnapshotHolder(random_snapshot("v1", dim=8))
        server, port = create_server(
            ServerConfig(), holder, CollectorRegistry(), recommender=lambda *_: servicer
        )
        server.mark_serving()
        servers.append(server)
        return port

    yield _serve
    for server in servers:
        server.shutdown(0).wait(5)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_unavailable_and_shed_calls_are_retried(
    serve: Callable[[Scripted], int], code: grpc.StatusCode
) -> None:
    servicer = Scripted([code, code])
    with SlimrankClient(f"127.0.0.1:{serve(servicer)}", timeout=10.0, retries=2) as client:
        assert client.recommend("u1", 3).model_version == "scripted"
    assert servicer.attempts == 3


def test_other_errors_are_not_retried(serve: Callable[[Scripted], int]) -> None:
    servicer = Scripted([grpc.StatusCode.INVALID_ARGUMENT])
    client = SlimrankClient(f"127.0.0.1:{serve(servicer)}", timeout=10.0, retries=4)
    with client, pytest.raises(grpc.RpcError) as info:
        client.recommend("u1", 3)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert servicer.attempts == 1


def test_the_timeout_bounds_the_whole_call_not_each_attempt(
    serve: Callable[[Scripted], int],
) -> None:
    """Attempts that each take 0.4 s and fail: four retries would take 2 s or more; the call
    must end at its one deadline (a bound, generous for a loaded machine, not a timing)."""
    servicer = Scripted([grpc.StatusCode.UNAVAILABLE] * 10, hold_s=0.4)
    timeout = 1.0
    with SlimrankClient(f"127.0.0.1:{serve(servicer)}", timeout=timeout, retries=4) as client:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            client.recommend("u1", 3)
        elapsed = time.monotonic() - start
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5 * timeout
    assert 2 <= servicer.attempts <= 3  # retried, within the deadline


def test_the_service_config_is_valid_grpc_json() -> None:
    config = json.loads(service_config(retries=9, backoff=0.05))
    policies = [m["retryPolicy"] for m in config["methodConfig"]]
    assert all(p["maxAttempts"] == 5 for p in policies)  # gRPC's cap
    assert json.loads(service_config(retries=0, backoff=0.05)) == {"methodConfig": []}
