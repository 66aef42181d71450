"""The server factory: servicers, interceptors, health, reflection, metrics endpoint.

``create_server`` binds and starts the server with health NOT_SERVING; the caller warms up
and calls ``mark_serving``. ``shutdown`` flips health to NOT_SERVING first, so load
balancers stop sending, then lets in-flight calls finish within the grace period.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from slimrank.serving.config import ServerConfig
from slimrank.serving.interceptors import ConcurrencyLimitInterceptor, MetricsInterceptor
from slimrank.serving.metrics import MetricsEndpoint, ServingMetrics, start_metrics_endpoint
from slimrank.serving.proto.slimrank.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)
from slimrank.serving.servicer import AdminServicer, RecommenderServicer, ReloadFn
from slimrank.serving.snapshot import SnapshotHolder, warm_up

log = logging.getLogger(__name__)

RECOMMENDER = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICES = ("", RECOMMENDER, ADMIN)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SlimrankServer:
    """A started gRPC server with its health servicer, metrics and optional /metrics endpoint."""

    def __init__(
        self,
        server: grpc.Server,
        health_servicer: health.HealthServicer,
        metrics: ServingMetrics,
        endpoint: MetricsEndpoint | None,
        grace_s: float,
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_endpoint = endpoint
        self._grace_s = grace_s

    @property
    def metrics_port(self) -> int | None:
        """Port of the HTTP /metrics endpoint, or None when it was not started."""
        return None if self.metrics_endpoint is None else self.metrics_endpoint.port

    def mark_serving(self) -> None:
        """Report SERVING for the server and each service (call after warm-up)."""
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving")

    def shutdown(self, grace: float | None = None) -> threading.Event:
        """Report NOT_SERVING, stop taking calls, let in-flight ones finish within ``grace`` s.

        Returns the event set once the server has stopped; wait on it to block.
        """
        grace = self._grace_s if grace is None else grace
        self.health.enter_graceful_shutdown()
        log.info("shutting down, grace %.1f s", grace)
        stopped = self.server.stop(grace)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
            self.metrics_endpoint = None
        return stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True if it timed out."""
        return self.server.wait_for_termination(timeout)


def create_server(
    config: ServerConfig,
    holder: SnapshotHolder,
    registry: CollectorRegistry,
    reload_fn: ReloadFn | None = None,
    warm: bool = True,
    *,
    reload_lock: threading.Lock | None = None,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[SlimrankServer, int]:
    """Build, bind and start the server; returns it (health NOT_SERVING) and its bound port.

    With ``warm`` the served snapshot is warmed up before the port opens. ``reload_lock`` is
    shared with a bundle watcher; ``credentials`` bind a TLS port instead of a plaintext one;
    ``interceptors`` (e.g. admin auth) run after the metrics one and before the load bound.
    """
    if warm:
        warm_up(holder.get())
    metrics = ServingMetrics(registry)
    holder.subscribe(metrics.observe_model)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="slimrank"),
        interceptors=[
            MetricsInterceptor(metrics),
            *interceptors,
            ConcurrencyLimitInterceptor(config.max_inflight, metrics),
        ],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", int(config.so_reuseport)),
        ],
        maximum_concurrent_rpcs=config.max_pending_rpcs,
    )
    recommender_pb2_grpc.add_RecommenderServicer_to_server(
        RecommenderServicer(holder, config, metrics), server
    )
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminServicer(holder, metrics, reload_fn, reload_lock), server
    )
    health_servicer = health.HealthServicer()
    for service in HEALTH_SERVICES:
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        names = (RECOMMENDER, ADMIN, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    address = f"{config.host}:{config.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    endpoint = None
    if config.metrics_port is not None:
        endpoint = start_metrics_endpoint(config.metrics_host, config.metrics_port, registry)
    server.start()
    log.info("gRPC on %s:%d, model %s", config.host, port, holder.get().version)
    return SlimrankServer(server, health_servicer, metrics, endpoint, config.grace_s), port


def serve_forever(
    config: ServerConfig,
    holder: SnapshotHolder,
    registry: CollectorRegistry,
    reload_fn: ReloadFn | None = None,
    on_ready: Callable[[SlimrankServer, int], None] | None = None,
    *,
    reload_lock: threading.Lock | None = None,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; call from the main thread.

    ``on_ready(server, port)`` runs once the server reports SERVING; the keyword arguments
    are passed to :func:`create_server`.
    """
    server, port = create_server(
        config,
        holder,
        registry,
        reload_fn,
        reload_lock=reload_lock,
        credentials=credentials,
        interceptors=interceptors,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        server.mark_serving()
        if on_ready is not None:
            on_ready(server, port)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.shutdown().wait()
        log.info("stopped")
