"""Prometheus metrics of the server, built on a registry the caller passes in."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)

from slimrank.serving.admission import Refusal
from slimrank.serving.listen import listening
from slimrank.serving.snapshot import ModelSnapshot

# 0.5 ms .. 2.5 s, roughly x2 apart: fine enough for a millisecond-scale service. 0.025 is the
# latency SLO's threshold: the burn-rate alerts and the dashboard read le="0.025".
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.006,
    0.008,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
# No ``*_created`` series: Prometheus does not use them, and they double every counter's and
# histogram's series (prometheus_client's switch is process-wide).
disable_created_metrics()

CANDIDATE_BUCKETS = (0, 10, 25, 50, 100, 200, 400, 800, 1600, 3200)
STAGES = ("retrieve", "features", "rank", "queue")


class ServingMetrics:
    """Every metric the server exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "slimrank_grpc_requests",
            "gRPC calls answered, by full method name and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "slimrank_grpc_request_duration_seconds",
            "Time in the handler, from the start of the call to its answer.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage_duration = Histogram(
            "slimrank_stage_duration_seconds",
            "Time per serving stage: queue (admitted to handler start), retrieve, features, rank.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # multiprocess_mode says how --workers N merges one gauge across worker processes.
        self.inflight = Gauge(
            "slimrank_inflight_requests",
            "Calls being handled now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.offered_load = Gauge(
            "slimrank_offered_load",
            "Share of a process's capacity that the model calls offered over the last 0.2 s "
            "take (their rate times the measured cost of one call), at the last call; the "
            "busiest process with --workers. Below --overload-fraction a queue is worked off, "
            "not refused.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.shed = Counter(
            "slimrank_shed_requests",
            "Calls refused with RESOURCE_EXHAUSTED when they arrived, by the admission bound "
            "that refused them: in_progress (max_inflight), total (max_pending_rpcs), wait "
            "(the expected wait over max_wait_ms, burst_wait_ms, a reload's or a stall's).",
            ["reason"],
            registry=registry,
        )
        # Every reason's series from the start: a rate() over a series born at its first
        # refusal misses that refusal, and an alert on it needs the series to exist.
        self._shed = {reason: self.shed.labels(reason.value) for reason in Refusal}
        self.stalls = Counter(
            "slimrank_stalls",
            "Times the server process stood still (its freeze watch woke over 50 ms after its "
            "last wake-up, or two calls were taken far further apart than usual: the machine "
            "froze it); the queue that formed meanwhile is worked off, not refused.",
            registry=registry,
        )
        # A gauge, not an Info: prometheus_client's multiprocess mode drops Info metrics.
        self.model = Gauge(
            "slimrank_model_info",
            "1 for the served model bundle version.",
            ["version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._served_version: str | None = None
        self.reloads = Counter(
            "slimrank_model_reloads",
            "Successful model swaps.",
            registry=registry,
        )
        self.reload_failures = Counter(
            "slimrank_model_reload_failures",
            "Reloads that failed to load or warm up; the previous model kept serving.",
            registry=registry,
        )
        self.index_items = Gauge(
            "slimrank_index_items",
            "Items in the served index.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.candidates = Histogram(
            "slimrank_candidates_per_request",
            "Candidates ranked per call, after exclusions.",
            buckets=CANDIDATE_BUCKETS,
            registry=registry,
        )
        # Resolved once: labels() takes a lock and builds a key on every call.
        self._stages = {stage: self.stage_duration.labels(stage) for stage in STAGES}
        # process_cpu_seconds_total, process_resident_memory_bytes, ... for the dashboard. With
        # --workers N the merged endpoint reads only the multiprocess files, so it lacks these.
        ProcessCollector(registry=registry)

    def refused(self, reason: Refusal) -> None:
        """Count one call refused on arrival by the bound ``reason``."""
        self._shed[reason].inc()

    def observe_model(self, snapshot: ModelSnapshot) -> None:
        """Describe ``snapshot`` as the served model (replaces the previous version label)."""
        previous, self._served_version = self._served_version, snapshot.version
        if previous is not None and previous != snapshot.version:
            # Zero first: in multiprocess mode remove() cannot delete the shared file's value.
            self.model.labels(previous).set(0)
            self.model.remove(previous)
        self.model.labels(snapshot.version).set(1)
        self.index_items.set(snapshot.n_items)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as serving stage ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            child = self._stages.get(name) or self.stage_duration.labels(name)
            child.observe(time.perf_counter() - start)


METRICS_PATH = "/metrics"


@dataclasses.dataclass(frozen=True)
class MetricsEndpoint:
    """A running HTTP ``/metrics`` server."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        return int(self.httpd.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log; say nothing."""


def metrics_app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """Return a WSGI app serving ``registry`` at ``/metrics`` and 404 on every other path.

    (prometheus_client's own server answers the metrics on any path, so a typo in a scrape
    config or a probe of ``/`` looked like success.)
    """
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == METRICS_PATH:
            return exposition(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"not found; the metrics are at {METRICS_PATH}\n".encode()]

    return app


def start_metrics_endpoint(host: str, port: int, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve ``registry`` on ``http://host:port/metrics`` in a daemon thread; port 0 picks one.

    :class:`~slimrank.serving.listen.ListenError` names the address if it cannot be bound.
    """
    server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
    app = metrics_app(registry)
    with listening("metrics", host, port):
        httpd = make_server(host.strip("[]"), port, app, server_class, _QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="slimrank-metrics", daemon=True)
    thread.start()
    return MetricsEndpoint(httpd, thread)
