"""The real server's /metrics follows Prometheus conventions: no ``_created`` series."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import SnapshotHolder, random_snapshot


def test_metrics_endpoint_has_no_created_series() -> None:
    holder = SnapshotHolder(random_snapshot("v1", dim=16))
    server, port = create_server(ServerConfig(metrics_port=0), holder, CollectorRegistry())
    server.mark_serving()
    try:
        with SlimrankClient(f"127.0.0.1:{port}") as client:
            client.recommend("u1", 3)  # counters and histograms get samples
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    finally:
        server.shutdown(0).wait(5)
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert "slimrank_grpc_requests_total" in names
    assert "slimrank_grpc_request_duration_seconds_bucket" in names
    assert sorted(n for n in names if n.endswith("_created")) == []
