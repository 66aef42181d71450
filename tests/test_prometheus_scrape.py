"""A real Prometheus scrapes a real slimrank server; every dashboard query must return data.

The server is ``slimrank.serving.server.create_server`` over a small random snapshot, with
the process collector on its registry as in production. Prometheus (the distribution's
binary) runs on a free loopback port with the repository's recording and alert rules, a 1 s
scrape and evaluation interval, while a thread drives Recommend, Search, invalid calls and
reloads (one good, one failing).
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry, ProcessCollector
from test_prometheus_rules import (
    RULE_FILES,
    dashboard_queries,
    require_binary,
    rules_by_kind,
    substitute,
)

from slimrank.errors import IntegrityError
from slimrank.serving import metrics as serving_metrics
from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import ModelSnapshot, SnapshotHolder, random_snapshot

pytestmark = pytest.mark.slow

DIM = 16
SLO_BUCKET = 0.025  # le="0.025" in the latency SLI and the dashboard
# While the server's bucket list lacks 0.025, the queries that read it are strict xfails (they
# must come back empty); once the bucket exists they run as ordinary tests.
MISSING_SLO_BUCKET = SLO_BUCKET not in serving_metrics.LATENCY_BUCKETS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


class Prometheus:
    """A Prometheus process on loopback and its HTTP API."""

    def __init__(self, base: str, process: subprocess.Popen) -> None:
        self.base = base
        self.process = process

    def query(self, expr: str) -> list[dict]:
        body = get_json(f"{self.base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else float("nan")


def load_snapshot(version: str | None) -> ModelSnapshot:
    if version == "corrupt":
        raise IntegrityError("model.onnx: sha256 mismatch")
    return random_snapshot(version or "v2", dim=DIM, seed=2)


def drive(client: SlimrankClient, stop: threading.Event) -> None:
    """Send a steady mix of calls until ``stop``; invalid calls are INVALID_ARGUMENT."""
    i = 0
    while not stop.is_set():
        client.recommend(f"u{i % 100}", 10, exclude=[f"i{i % 500}"])
        client.recommend("", 5)  # popularity path
        client.search([0.1] * DIM, 5)
        if i % 10 == 0:
            with pytest.raises(grpc.RpcError) as info:
                client.recommend("u1", 0)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        i += 1
        time.sleep(0.005)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> Iterator[Prometheus]:
    """Prometheus after it has scraped the server for a while, under traffic and reloads."""
    binary = require_binary("prometheus")
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    holder = SnapshotHolder(random_snapshot("v1", dim=DIM))
    server, port = create_server(ServerConfig(metrics_port=0), holder, registry, load_snapshot)
    server.mark_serving()
    client = SlimrankClient(f"127.0.0.1:{port}", timeout=5.0)

    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [
            {
                "job_name": "slimrank",
                "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    web_port = free_port()
    log = (tmp / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{web_port}", process)
    stop = threading.Event()
    traffic = threading.Thread(target=drive, args=(client, stop), daemon=True)
    try:
        wait_until(lambda: prom.scalar('up{job="slimrank"}') == 1, 30, "first scrape", tmp)
        traffic.start()
        time.sleep(2.5)  # a few scrapes under traffic before the reloads
        assert client.reload().reloaded
        with pytest.raises(grpc.RpcError):
            client.reload("corrupt")
        # rate() needs two samples after the reloads, and recording rules a few evaluations.
        wait_until(
            lambda: (
                prom.scalar("changes(slimrank_model_reloads_total[1m])") >= 1
                and prom.scalar('count_over_time(up{job="slimrank"}[1m])') >= 6
            ),
            30,
            "scrapes after the reloads",
            tmp,
        )
        time.sleep(2)
        assert traffic.is_alive(), "the traffic thread died"
        yield prom
    finally:
        stop.set()
        traffic.join(10)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        client.close()
        server.shutdown(0).wait(5)


def wait_until(ok, timeout: float, what: str, tmp: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except OSError:
            pass  # Prometheus not listening yet
        time.sleep(0.3)
    log = (tmp / "prometheus.log").read_text()[-3000:]
    pytest.fail(f"timed out waiting for {what}; Prometheus log:\n{log}")


def _query_params() -> list:
    params = []
    for where, expr in dashboard_queries():
        marks = []
        if 'le="0.025"' in expr:
            marks.append(
                pytest.mark.xfail(
                    MISSING_SLO_BUCKET,
                    reason="slimrank.serving.metrics.LATENCY_BUCKETS lacks 0.025",
                    strict=True,
                )
            )
        params.append(pytest.param(expr, id=where, marks=marks))
    return params


@pytest.mark.parametrize("expr", _query_params())
def test_dashboard_query_returns_data(scraped, expr):
    result = scraped.query(substitute(expr))
    assert result, f"no data for {substitute(expr)}"
    values = [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), values


def test_served_model_and_reload_events_are_visible(scraped):
    versions = scraped.query('slimrank_model_info{job="slimrank"} == 1')
    assert [r["metric"]["version"] for r in versions] == ["v2"]
    assert scraped.scalar('slimrank_model_reloads_total{job="slimrank"}') == 1
    assert scraped.scalar('slimrank_model_reload_failures_total{job="slimrank"}') == 1
    assert scraped.scalar('slimrank_index_items{job="slimrank"}') == 500


def test_invalid_arguments_do_not_count_as_errors(scraped):
    assert (
        scraped.scalar('sum(rate(slimrank_grpc_requests_total{code="INVALID_ARGUMENT"}[1m]))') > 0
    )
    (error_ratio,) = [e for w, e in dashboard_queries() if "Error ratio" in w]
    assert scraped.scalar(substitute(error_ratio)) == 0
    assert scraped.scalar('slimrank:error_ratio:5m{job="slimrank"}') == 0


def test_rules_load_and_evaluate_without_errors(scraped):
    groups = get_json(f"{scraped.base}/api/v1/rules")["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    expected = set(rules_by_kind("record")) | set(rules_by_kind("alert"))
    assert set(rules) == expected
    bad = {name: r.get("lastError") for name, r in rules.items() if r["health"] != "ok"}
    assert bad == {}


@pytest.mark.parametrize(
    "record",
    [
        "slimrank:request_rate:5m",
        "slimrank:latency_p99:5m",
        "slimrank:stage_latency_p99:5m",
        "slimrank:error_ratio:5m",
        pytest.param(
            "slimrank:slow_ratio:5m",
            marks=pytest.mark.xfail(
                MISSING_SLO_BUCKET, reason="LATENCY_BUCKETS lacks 0.025", strict=True
            ),
        ),
    ],
)
def test_recording_rules_produce_series(scraped, record):
    assert scraped.query(f'{record}{{job="slimrank"}}'), record


def test_only_the_reload_failure_alert_fires(scraped):
    """One reload failed on purpose; nothing else is wrong with the server."""
    alerts = get_json(f"{scraped.base}/api/v1/alerts")["data"]["alerts"]
    firing = sorted(a["labels"]["alertname"] for a in alerts if a["state"] == "firing")
    assert firing == ["SlimrankModelReloadFailed"]
