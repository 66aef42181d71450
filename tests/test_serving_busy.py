"""Inline handlers: calls that queued behind a loop busy for too long are refused on arrival."""

from __future__ import annotations

import threading

import grpc
import pytest
from blocking_snapshot import blocking
from prometheus_client import CollectorRegistry

from slimrank.serving.admission import BusyClock, TimedSelector
from slimrank.serving.config import ServerConfig
from slimrank.serving.proto.slimrank.v1 import recommender_pb2, recommender_pb2_grpc
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import SnapshotHolder, random_snapshot


def test_busy_clock_by_hand() -> None:
    clock = BusyClock(max_busy_s=0.010, idle_gap_s=0.001)
    clock.waited(4.990, 5.000)  # the selector blocked 10 ms: a pause that ended at 5.000
    assert clock.busy_for(5.0045) == pytest.approx(0.0045)
    clock.waited(5.0050, 5.0058)  # blocked 0.8 ms only: work was waiting, no pause
    assert clock.busy_for(5.0100) == pytest.approx(0.0100) and not clock.overloaded(5.0100)
    assert clock.overloaded(5.0101)
    clock.waited(5.0101, 5.0113)  # blocked 1.2 ms: a pause; the busy period starts again
    assert clock.busy_for(5.0113) == 0.0 and not clock.overloaded(5.0150)
    with pytest.raises(ValueError, match="max_busy_s"):
        BusyClock(0.0)


def test_timed_selector_reports_each_wait() -> None:
    selector = TimedSelector()
    waits: list[tuple[float, float]] = []
    selector.listeners.append(lambda a, b: waits.append((a, b)))
    assert selector.select(0.03) == []
    assert len(waits) == 1 and waits[0][1] - waits[0][0] >= 0.025
    selector.close()


def test_calls_queued_behind_a_long_inline_call_are_refused_then_served() -> None:
    snap, entered, release = blocking(random_snapshot("v1", dim=16))
    config = ServerConfig(handler_threads=0, max_wait_s=0.1, idle_gap_s=0.05)
    registry = CollectorRegistry()
    server, port = create_server(config, SnapshotHolder(snap), registry)
    server.mark_serving()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = recommender_pb2_grpc.RecommenderStub(channel)
    request = recommender_pb2.RecommendRequest(user_id="u1", k=3)
    try:
        first = stub.Recommend.future(request, timeout=10)
        assert entered.acquire(timeout=5)  # the loop is inside the first call's handler
        queued = [stub.Recommend.future(request, timeout=10) for _ in range(3)]
        threading.Event().wait(0.3)  # they wait in grpc's core, the loop busy for 0.3 s
        release.set()
        assert len(first.result(timeout=5).items) == 3
        codes = [f.exception(timeout=5) for f in queued]
        assert [c.code() if c else grpc.StatusCode.OK for c in codes] == [
            grpc.StatusCode.RESOURCE_EXHAUSTED
        ] * 3
        threading.Event().wait(0.2)  # a pause longer than the idle gap
        assert len(stub.Recommend(request, timeout=5).items) == 3
        assert registry.get_sample_value("slimrank_shed_requests_total") == 3
    finally:
        release.set()
        channel.close()
        server.shutdown(0).wait(5)
