"""The server factory: servicers, interceptors, health, reflection, metrics endpoint.

``create_server`` binds and starts the server with health NOT_SERVING; the caller warms up
and calls ``mark_serving``. ``shutdown`` flips health to NOT_SERVING first, so load
balancers stop sending, then lets in-flight calls finish within the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from slimrank.serving import heap
from slimrank.serving.admission import Admission, LoadActivity
from slimrank.serving.aio_engine import (
    LoopThread,
    ServingInterceptor,
    loop_thread,
    stop_loop_thread,
)
from slimrank.serving.batch import BatchRecommenderServicer
from slimrank.serving.config import ServerConfig
from slimrank.serving.core_queue import CoreQueue
from slimrank.serving.freeze_watch import FreezeWatch
from slimrank.serving.interceptors import ConcurrencyLimitInterceptor, MetricsInterceptor
from slimrank.serving.listen import GRPC_REASON, ListenError, listening
from slimrank.serving.metrics import MetricsEndpoint, ServingMetrics, start_metrics_endpoint
from slimrank.serving.proto.slimrank.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)
from slimrank.serving.servicer import AdminServicer, RecommenderServicer
from slimrank.serving.snapshot import SnapshotHolder, warm_up
from slimrank.serving.stop_request import stop_on
from slimrank.serving.swap import ReloadFn

log = logging.getLogger(__name__)

RECOMMENDER = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICES = ("", RECOMMENDER, ADMIN)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LISTENER_CLOSE_S = 2.0  # how long a stop waits, at most, for the HTTP endpoint to close
STOP_MARGIN_S = 5.0  # how long past its grace a stop waits for grpc.aio before giving up
DRAIN_POLL_S = 0.005  # how often a stop checks whether the calls in progress have finished

# (holder, config, metrics) -> the Recommender servicer a server uses.
RecommenderFactory = Callable[[SnapshotHolder, ServerConfig, ServingMetrics], Any]


class SlimrankServer:
    """A started gRPC server with its health servicer, metrics and optional /metrics endpoint."""

    def __init__(
        self,
        server: grpc.Server | grpc.aio.Server,
        health_servicer: health.HealthServicer | health.aio.HealthServicer,
        metrics: ServingMetrics,
        endpoint: MetricsEndpoint | None,
        grace_s: float,
        loop: LoopThread | None = None,
        pools: Sequence[futures.ThreadPoolExecutor] = (),
        watch: FreezeWatch | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_endpoint = endpoint
        self._grace_s = grace_s
        self._loop = loop  # None: the sync engine
        self._pools = tuple(pools)
        self._watch = watch
        self._stopped: threading.Event | None = None
        self._admission = admission  # None: the sync engine
        self._stop_task: asyncio.Future[None] | None = None
        self.http: Any = None  # the HTTP/JSON endpoint (http_server.HttpFront), if started

    @property
    def http_port(self) -> int | None:
        """Port of the HTTP/JSON endpoint, or None when it was not started."""
        return None if self.http is None else int(self.http.port)

    @property
    def metrics_port(self) -> int | None:
        """Port of the HTTP /metrics endpoint, or None when it was not started."""
        return None if self.metrics_endpoint is None else self.metrics_endpoint.port

    def _set_health(self, service: str, status: int) -> None:
        if self._loop is None:
            self.health.set(service, status)
        else:
            self._loop.run(self.health.set(service, status))

    def mark_serving(self) -> None:
        """Report SERVING for the server and each service (call after warm-up)."""
        for service in HEALTH_SERVICES:
            self._set_health(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving")

    def shutdown(self, grace: float | None = None) -> threading.Event:
        """Report NOT_SERVING, stop taking calls, let in-flight ones finish within ``grace`` s.

        Returns the event set once the server has stopped; wait on it to block.
        """
        grace = self._grace_s if grace is None else grace
        log.info("shutting down, grace %.1f s", grace)
        if self._loop is None:
            self.health.enter_graceful_shutdown()
            stopped = self.server.stop(grace)
        elif self._stopped is not None:
            stopped = self._stopped
        else:
            self._loop.run(self.health.enter_graceful_shutdown())
            if self.http is not None:  # no new HTTP calls; those in progress finish
                self._loop.run(self.http.close(), timeout=grace + LISTENER_CLOSE_S)
                self.http = None
            stopped = self._stopped = threading.Event()
            # Returns once new calls are refused, like the sync server's stop().
            self._loop.run(self._begin_stop(grace, stopped))
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
            self.metrics_endpoint = None
        return stopped

    async def _begin_stop(self, grace: float, stopped: threading.Event) -> None:
        """Refuse new calls from now on (UNAVAILABLE), then stop the aio server once the
        calls in progress have finished or ``grace`` has passed; ``stopped`` is set then."""
        if self._admission is not None:
            self._admission.draining = True
        # Kept: the event loop holds only a weak reference to a task.
        self._stop_task = asyncio.ensure_future(self._drain_and_stop(grace))
        self._stop_task.add_done_callback(lambda _: self._stopped_aio(stopped))

    async def _drain_and_stop(self, grace: float) -> None:
        # The listener stays open meanwhile: a call that arrives is refused by the serving
        # interceptor with UNAVAILABLE, which clients retry. gRPC's core would cancel it
        # instead, were it to race the stop (as a call did on CI while grpc.aio closed its
        # listener), and clients do not retry CANCELLED.
        deadline = time.monotonic() + grace
        admission = self._admission
        while admission is not None and admission.total_in_progress > 0:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        left = max(0.0, deadline - time.monotonic())
        try:  # grpc.aio's stop cancels what is left after ``left``; never wait on it forever
            await asyncio.wait_for(self.server.stop(left), left + STOP_MARGIN_S)
        except TimeoutError:
            log.warning("gRPC did not stop within %.1f s of its grace; stopping anyway", left)

    def _stopped_aio(self, stopped: threading.Event) -> None:
        if self._watch is not None:
            self._watch.stop()
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True if it timed out."""
        if self._loop is None:
            return self.server.wait_for_termination(timeout)
        return bool(self._loop.run(self.server.wait_for_termination(timeout)))


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
    recommender: RecommenderFactory | None = None,
) -> tuple[SlimrankServer, int]:
    """Build, bind and start the server; returns it (health NOT_SERVING) and its bound port.

    With ``warm`` the served snapshot is warmed up before the port opens. ``reload_lock`` is
    shared with a bundle watcher; ``credentials`` bind a TLS port instead of a plaintext one;
    ``interceptors`` (e.g. admin auth) run after admission and metrics, before the handler.
    ``recommender(holder, config, metrics)`` builds the Recommender servicer instead of
    :class:`RecommenderServicer` (the serving benchmark's echo answers through the same server).
    """
    if warm:
        warm_up(holder.get())
    if config.switch_interval_s is not None:
        sys.setswitchinterval(config.switch_interval_s)
    metrics = ServingMetrics(registry)
    holder.subscribe(metrics.observe_model)
    servicers = (
        (recommender or BatchRecommenderServicer)(holder, config, metrics),
        AdminServicer(holder, metrics, reload_fn, reload_lock),
    )
    watch = None
    if config.engine == "sync":
        server, health_servicer, port = _start_sync(
            config, metrics, servicers, credentials, interceptors
        )
        loop, pools, admission = None, (), None
    else:
        loop = loop_thread()
        server, health_servicer, port, pools, admission = loop.run(
            _start_aio(config, metrics, servicers, credentials, interceptors, holder.loading)
        )
        if config.freeze_watch_s is not None:
            watch = FreezeWatch(holder.loading, config.freeze_watch_s, metrics.stalls.inc).start()
    slimrank = SlimrankServer(
        server, health_servicer, metrics, None, config.grace_s, loop, pools, watch, admission
    )
    try:
        if loop is not None and config.http_port is not None:
            with listening("HTTP/JSON", config.http_host, config.http_port):
                slimrank.http = _start_http(loop, config, servicers[0], admission, metrics, pools)
        if config.metrics_port is not None:
            slimrank.metrics_endpoint = start_metrics_endpoint(
                config.metrics_host, config.metrics_port, registry
            )
    except ListenError:
        slimrank.shutdown(0).wait(config.grace_s + LISTENER_CLOSE_S)  # the gRPC port is open
        raise
    own = "" if config.own_port is None else f" (and its own port {config.own_port})"
    log.info(
        "gRPC (%s) on %s:%d%s, model %s",
        config.engine,
        config.host,
        port,
        own,
        holder.get().version,
    )
    if slimrank.http is not None:
        log.info("HTTP/JSON on %s:%d", config.http_host, slimrank.http_port)
    return slimrank, port


def _add_services(
    server: grpc.Server | grpc.aio.Server,
    servicers: tuple[RecommenderServicer, AdminServicer],
    health_servicer: Any,
    reflection_on: bool,
) -> None:
    recommender_pb2_grpc.add_RecommenderServicer_to_server(servicers[0], server)
    admin_pb2_grpc.add_AdminServicer_to_server(servicers[1], server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_on:
        names = (RECOMMENDER, ADMIN, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)


def _bind(
    server: grpc.Server | grpc.aio.Server,
    config: ServerConfig,
    credentials: grpc.ServerCredentials | None,
) -> int:
    """Listen on ``config.port`` (and ``config.own_port``, if set); return the port."""
    port = 0
    for wanted in (config.port, config.own_port):
        if wanted is None:
            continue
        address = f"{config.host}:{wanted}"
        with listening("gRPC", config.host, wanted):
            if credentials is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, credentials)
            if bound == 0:  # older grpc releases return 0 instead of raising
                raise OSError(None, GRPC_REASON)
        port = port or bound
    return port


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _options(config: ServerConfig) -> list[tuple[str, int]]:
    """The grpc channel arguments of the server: message sizes, connection limits, no trace."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", int(config.so_reuseport)),
        ("grpc.max_connection_idle_ms", _ms(config.max_connection_idle_s)),
        ("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace_s)),
        ("grpc.server_handshake_timeout_ms", _ms(config.handshake_timeout_s)),
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout_s)),
        # Keepalive enforcement: clients may not ping without calls, nor more often than this.
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(config.min_client_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
        # No channelz trace events: admission reads the server's channelz node every few
        # milliseconds under load (core_queue.py), and without the trace a read costs less:
        # 0.058 against 0.10 ms on an idle server, 0.128 against 0.137 ms of CPU on a busy
        # one (scratch runs). The call counts stay.
        ("grpc.max_channel_trace_event_memory_per_node", 0),
    ]
    if config.max_connection_age_s is not None:
        options.append(("grpc.max_connection_age_ms", _ms(config.max_connection_age_s)))
    return options


def _start_sync(
    config: ServerConfig,
    metrics: ServingMetrics,
    servicers: tuple[RecommenderServicer, AdminServicer],
    credentials: grpc.ServerCredentials | None,
    interceptors: Sequence[grpc.ServerInterceptor],
) -> tuple[grpc.Server, health.HealthServicer, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="slimrank"),
        interceptors=[
            MetricsInterceptor(metrics),
            *interceptors,
            ConcurrencyLimitInterceptor(config.max_inflight, metrics),
        ],
        options=_options(config),
        maximum_concurrent_rpcs=config.max_pending_rpcs,
    )
    health_servicer = health.HealthServicer()
    for service in HEALTH_SERVICES:
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    _add_services(server, servicers, health_servicer, config.reflection)
    port = _bind(server, config, credentials)
    server.start()
    return server, health_servicer, port


async def _start_aio(
    config: ServerConfig,
    metrics: ServingMetrics,
    servicers: tuple[RecommenderServicer, AdminServicer],
    credentials: grpc.ServerCredentials | None,
    interceptors: Sequence[grpc.ServerInterceptor],
    loading: LoadActivity | None = None,
) -> tuple[grpc.aio.Server, Any, int, list[futures.ThreadPoolExecutor], Admission]:
    """Build and start the grpc.aio server (on the event loop thread); admission reads
    ``loading`` (the served snapshot holder's reloads)."""
    handler_pool = None
    if config.handler_threads > 0:
        handler_pool = futures.ThreadPoolExecutor(
            config.handler_threads, thread_name_prefix="slimrank-handler"
        )
    other_pool = futures.ThreadPoolExecutor(config.max_workers, thread_name_prefix="slimrank")
    batch_pool = http_pool = None
    if handler_pool is None:
        # Batches never run on the loop, nor on other_pool, where Admin calls would wait
        # behind them: one thread of their own. HTTP/JSON model calls neither (_start_http).
        batch_pool = futures.ThreadPoolExecutor(1, thread_name_prefix="slimrank-batch")
        if config.http_port is not None:
            http_pool = futures.ThreadPoolExecutor(1, thread_name_prefix="slimrank-http")
    # Order: [handler, other] with handler threads; else [other, batch] and http last.
    pools = [p for p in (handler_pool, other_pool, batch_pool, http_pool) if p is not None]
    admission = Admission(
        config.max_inflight,
        config.max_pending_rpcs,
        config.max_wait_s,
        parallel=max(1, config.handler_threads),
        burst_wait_s=config.burst_wait_s,
        burst_recovery_s=config.burst_recovery_s,
        reload_wait_s=config.reload_wait_s,
        loading=loading,
        overload_fraction=config.overload_fraction,
    )
    serving = ServingInterceptor(
        metrics, admission, interceptors, handler_pool, other_pool, batch_pool=batch_pool
    )
    servers_before = CoreQueue.server_ids() if config.core_queue_refresh_s is not None else None
    server = grpc.aio.server(interceptors=[serving], options=_options(config))
    health_servicer = health.aio.HealthServicer()
    for service in HEALTH_SERVICES:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    _add_services(server, servicers, health_servicer, config.reflection)
    try:
        port = _bind(server, config, credentials)
        await server.start()
    except BaseException:
        for pool in pools:
            pool.shutdown(wait=False)
        raise
    if config.core_queue_refresh_s is not None:
        serving.core_queue = CoreQueue.of_new_server(servers_before, config.core_queue_refresh_s)
    return server, health_servicer, port, pools, admission


def _start_http(
    loop: LoopThread,
    config: ServerConfig,
    recommender: Any,
    admission: Admission,
    metrics: ServingMetrics,
    pools: Sequence[futures.ThreadPoolExecutor],
) -> Any:
    """Start the HTTP/JSON endpoint on the aio loop, sharing admission and handler threads."""
    from slimrank.serving.http_api import HttpApi
    from slimrank.serving.http_server import start_http

    # With handler threads, HTTP calls share them. Without (model calls on the loop), they
    # run on one thread of their own: on the loop an HTTP call is admitted only when the
    # loop reaches it, and the calls waiting for the loop are invisible to admission
    # (grpc's core queue, which it counts, holds only gRPC calls), so HTTP never shed load.
    # On a thread, admission counts the HTTP calls in progress as it does with
    # --handler-threads, and the loop keeps reading new ones.
    if config.handler_threads > 0:  # pools: handler, other
        http_pool, batch_pool = pools[0], None
    else:  # pools: other, batch, http; a batch on the HTTP thread would hold every HTTP call
        http_pool, batch_pool = pools[2], pools[1]
    api = HttpApi(
        recommender,
        admission,
        metrics,
        http_pool,
        config.max_http_body_bytes,
        batch_pool=batch_pool,
    )
    return loop.run(
        start_http(
            api,
            config.http_host,
            config.http_port or 0,
            reuse_port=config.so_reuseport,
            grace_s=config.grace_s,
        )
    )


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
    recommender: RecommenderFactory | None = None,
    after_stop: signal.Handlers | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; call from the main thread.

    ``on_ready(server, port)`` runs once the server reports SERVING; ``after_stop`` is the
    handler of those signals once the server has stopped (default: the ones before); the
    other keyword arguments are passed to :func:`create_server`. This is the process's whole
    serving life: the event loop thread is stopped once the server has
    (:func:`stop_loop_thread`).
    """
    try:
        server, port = create_server(
            config,
            holder,
            registry,
            reload_fn,
            reload_lock=reload_lock,
            credentials=credentials,
            interceptors=interceptors,
            recommender=recommender,
        )
    except BaseException:
        stop_loop_thread()  # as below: before a half-started grpc.aio server is released
        raise
    with stop_on(STOP_SIGNALS, then=after_stop) as stop:
        try:
            heap.freeze()  # what lives as long as the process is no longer walked by the GC
            server.mark_serving()
            if on_ready is not None:
                on_ready(server, port)
            stop.wait()
        finally:
            # A second SIGTERM during the drain (a supervisor signalling every process of the
            # group, then the parent of --workers forwarding its own) only asks the stop again:
            # with the default handler back it killed the worker mid-drain.
            server.shutdown().wait()
            # Before ``server`` is released: releasing grpc.aio's last server closes its
            # completion queue's socket from this thread, and a loop still polling it on its
            # own thread failed then with "Bad file descriptor" (at a worker's exit).
            stop_loop_thread()
    log.info("stopped")
