"""The server's configuration: ports, thread and concurrency bounds, request limits, reload."""

from __future__ import annotations

import dataclasses
import math

from slimrank.config import Config, require
from slimrank.serving.core_queue import DEFAULT_REFRESH_S

ENGINES = ("aio", "sync")


@dataclasses.dataclass(frozen=True)
class ServerConfig(Config):
    """How the gRPC server binds, bounds its work and validates requests.

    ``engine`` "aio" (grpc.aio): each call is admitted or refused on the event loop when it
    arrives, before it waits anywhere. Recommender calls beyond ``max_inflight`` in progress
    (running or waiting for the loop or a handler thread) and calls of any kind beyond
    ``max_pending_rpcs`` are refused at once with RESOURCE_EXHAUSTED, and every refusal is
    counted in the shed metric. Recommender handlers run on ``handler_threads`` threads, or
    inline on the event loop when it is 0; other sync handlers (Admin) on up to
    ``max_workers`` threads of their own.

    ``engine`` "sync" (the thread-pool ``grpc.server``, kept for ``bench/serving.py``'s
    comparison and not offered by ``slimrank serve``, because of the uncounted rejections
    below): Recommender
    calls beyond ``max_inflight`` are shed once they reach a worker thread; ``max_workers``
    must exceed it so that rejections and health checks still find a thread.
    ``max_pending_rpcs`` is grpc's own bound on accepted calls there; its rejections happen
    before any interceptor runs and are not counted.

    With ``max_wait_s`` (aio), a Recommender call is also refused when the calls in progress
    are expected to keep it waiting longer than that (their number x the mean handler time /
    ``handler_threads``), so accepted calls stay fast whatever a call costs; None: only
    ``max_inflight`` bounds them. The calls still queued in gRPC's core, which the server's
    code has not seen yet (they pile up while a busy event loop cannot take them), count as
    in progress too: read from channelz at most every ``core_queue_refresh_s``
    (:mod:`slimrank.serving.core_queue`; None: not counted). Until calls have been waiting
    without a break for ``burst_wait_s``, they may wait up to that instead (a burst below
    capacity is let through; a standing queue is overload; None: ``max_wait_s`` always). After
    a queue stood that long, the allowance comes back once none has stood for
    ``burst_recovery_s`` (so sustained overload is refused after ``max_wait_s``, not after
    ``burst_wait_s`` each time its queue empties for a moment). When the server stood still for
    ``g`` while calls waited (two calls taken far further apart than usual: the machine froze
    the process), the bound is at least ``g`` for the calls queued in the core when the stall
    is seen and for 25 ms after (``admission.HeldUpCalls``): those calls have waited already
    and are worked off, not refused (a stall: over 50 ms and 4x the usual time between two
    calls); such a time counts as 4x the mean in the estimates. While a bundle loads (a
    reload, and half a second after it), the bound is at least ``reload_wait_s`` (None: no
    change): the queue a load causes is worked off, not refused. So is a queue that forms
    while the model calls offered over the last 0.2 s take less than ``overload_fraction`` of
    the server's capacity (their rate times the measured cost of a call; 0: never): a random
    burst, a freeze of the machine or a busy neighbour at a load the server holds, not
    overload. A thread that wakes every
    ``freeze_watch_s`` (aio; None: none) notices a stall that began while the server was idle,
    which no two calls show (:mod:`slimrank.serving.freeze_watch`).

    ``switch_interval_s`` sets ``sys.setswitchinterval`` for the process (None: Python's 5 ms).

    Connections (each holds a file descriptor and memory): one with no call for
    ``max_connection_idle_s`` is closed (GOAWAY; a client reconnects on its next call), every
    one after ``max_connection_age_s`` (None: never) with ``max_connection_age_grace_s`` for
    its calls to finish, which also spreads long-lived clients over new replicas. One that
    has not finished the TLS / HTTP/2 handshake after ``handshake_timeout_s`` is dropped.
    The server pings an idle client every ``keepalive_time_s`` and drops it if no answer
    comes within ``keepalive_timeout_s`` (a peer that vanished); a client pinging more often
    than every ``min_client_ping_interval_s`` without calls, or pinging without calls at all,
    gets GOAWAY after two such pings.
    """

    engine: str = "aio"
    handler_threads: int = 1
    max_wait_s: float | None = None  # slimrank serve: --max-wait-ms, 5 ms by default
    core_queue_refresh_s: float | None = DEFAULT_REFRESH_S
    burst_wait_s: float | None = None  # slimrank serve: --burst-wait-ms, 30 ms by default
    burst_recovery_s: float = 0.25
    reload_wait_s: float | None = None  # slimrank serve: --reload-wait-ms, 250 ms by default
    overload_fraction: float = 0.8
    freeze_watch_s: float | None = 0.01
    switch_interval_s: float | None = None
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port
    max_workers: int = 12
    max_inflight: int = 8
    max_pending_rpcs: int = 64
    max_message_bytes: int = 1 << 20
    max_k: int = 100
    n_candidates: int = 200  # retrieved per request, before exclusions and ranking
    max_exclude: int = 1000  # bound on exclude_item_ids and on recent_item_ids
    max_id_length: int = 256
    min_time_left_s: float = 0.001  # abort DEADLINE_EXCEEDED below this before ranking
    reflection: bool = False
    metrics_port: int | None = None  # HTTP /metrics; None: not started, 0: a free port
    metrics_host: str = "127.0.0.1"
    grace_s: float = 5.0
    max_batch: int = 64  # requests per RecommendBatch call (one admission slot)
    # HTTP/JSON endpoint beside gRPC (aio engine only); None: not started, 0: a free port.
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    max_http_body_bytes: int = 1 << 20
    # Let several processes bind the same port (the kernel spreads connections among them).
    so_reuseport: bool = False
    # A second port this process alone listens on (`--worker-ports`: a front can then cap the
    # calls at each process on its own); None: none.
    own_port: int | None = None
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float | None = 1800.0
    max_connection_age_grace_s: float = 30.0
    handshake_timeout_s: float = 10.0
    keepalive_time_s: float = 120.0
    keepalive_timeout_s: float = 20.0
    min_client_ping_interval_s: float = 60.0

    def __post_init__(self) -> None:
        require(self.engine in ENGINES, self, "engine", self.engine, f"must be one of {ENGINES}")
        require(
            self.handler_threads >= 0,
            self,
            "handler_threads",
            self.handler_threads,
            "must be >= 0 (0: inline on the event loop)",
        )
        require(
            self.switch_interval_s is None or self.switch_interval_s > 0,
            self,
            "switch_interval_s",
            self.switch_interval_s,
            "must be None or > 0",
        )
        require(
            self.max_wait_s is None or self.max_wait_s > 0,
            self,
            "max_wait_s",
            self.max_wait_s,
            "must be None or > 0",
        )
        require(
            self.burst_wait_s is None or self.burst_wait_s > 0,
            self,
            "burst_wait_s",
            self.burst_wait_s,
            "must be None or > 0",
        )
        require(
            self.reload_wait_s is None or self.reload_wait_s > 0,
            self,
            "reload_wait_s",
            self.reload_wait_s,
            "must be None or > 0",
        )
        require(
            0 <= self.overload_fraction <= 1,
            self,
            "overload_fraction",
            self.overload_fraction,
            "must be in [0, 1] (0: every standing queue is overload)",
        )
        require(
            self.freeze_watch_s is None or 0 < self.freeze_watch_s < math.inf,
            self,
            "freeze_watch_s",
            self.freeze_watch_s,
            "must be None or a finite number > 0",
        )
        require(
            self.burst_recovery_s >= 0,
            self,
            "burst_recovery_s",
            self.burst_recovery_s,
            "must be >= 0 (0: the allowance comes back as soon as the queue empties)",
        )
        require(
            self.core_queue_refresh_s is None or self.core_queue_refresh_s >= 0,
            self,
            "core_queue_refresh_s",
            self.core_queue_refresh_s,
            "must be None or >= 0",
        )
        require(bool(self.host), self, "host", self.host, "must not be empty")
        require(0 <= self.port < 65536, self, "port", self.port, "must be in [0, 65535]")
        require(
            self.own_port is None or (0 < self.own_port < 65536 and self.own_port != self.port),
            self,
            "own_port",
            self.own_port,
            f"must be None or in [1, 65535] and not the shared port {self.port}",
        )
        require(self.max_inflight >= 1, self, "max_inflight", self.max_inflight, "must be >= 1")
        require(
            self.max_workers > self.max_inflight,
            self,
            "max_workers",
            self.max_workers,
            f"must exceed max_inflight={self.max_inflight} so shed calls are answered at once",
        )
        require(
            self.max_pending_rpcs >= self.max_workers,
            self,
            "max_pending_rpcs",
            self.max_pending_rpcs,
            f"must be >= max_workers={self.max_workers}",
        )
        require(
            self.max_message_bytes >= 1024,
            self,
            "max_message_bytes",
            self.max_message_bytes,
            "must be >= 1024",
        )
        require(self.max_k >= 1, self, "max_k", self.max_k, "must be >= 1")
        require(
            self.n_candidates >= self.max_k,
            self,
            "n_candidates",
            self.n_candidates,
            f"must be >= max_k={self.max_k}",
        )
        require(self.max_exclude >= 0, self, "max_exclude", self.max_exclude, "must be >= 0")
        require(self.max_id_length >= 1, self, "max_id_length", self.max_id_length, "must be >= 1")
        require(
            self.min_time_left_s >= 0,
            self,
            "min_time_left_s",
            self.min_time_left_s,
            "must be >= 0",
        )
        require(
            self.metrics_port is None or 0 <= self.metrics_port < 65536,
            self,
            "metrics_port",
            self.metrics_port,
            "must be None or in [0, 65535]",
        )
        require(self.grace_s >= 0, self, "grace_s", self.grace_s, "must be >= 0")
        require(self.max_batch >= 1, self, "max_batch", self.max_batch, "must be >= 1")
        require(
            self.http_port is None or 0 <= self.http_port < 65536,
            self,
            "http_port",
            self.http_port,
            "must be None or in [0, 65535]",
        )
        require(
            self.http_port is None or self.engine == "aio",
            self,
            "http_port",
            self.http_port,
            "the HTTP endpoint needs engine='aio' (it shares its event loop and admission)",
        )
        require(
            self.max_http_body_bytes >= 1024,
            self,
            "max_http_body_bytes",
            self.max_http_body_bytes,
            "must be >= 1024",
        )
        for name in (
            "max_connection_idle_s",
            "max_connection_age_grace_s",
            "handshake_timeout_s",
            "keepalive_time_s",
            "keepalive_timeout_s",
            "min_client_ping_interval_s",
        ):
            value = getattr(self, name)
            require(value > 0, self, name, value, "must be > 0 (seconds)")
        require(
            self.max_connection_age_s is None or self.max_connection_age_s > 0,
            self,
            "max_connection_age_s",
            self.max_connection_age_s,
            "must be None (never) or > 0 (seconds)",
        )


@dataclasses.dataclass(frozen=True)
class ReloadConfig(Config):
    """How often the watcher reads ``CURRENT`` and how long a failed version waits for a retry.

    ``poll_interval_s`` of 0 turns the watcher off (``Admin.Reload`` still works).
    """

    poll_interval_s: float = 5.0
    backoff_s: float = 60.0

    def __post_init__(self) -> None:
        require(
            self.poll_interval_s >= 0,
            self,
            "poll_interval_s",
            self.poll_interval_s,
            "must be >= 0 (0: no watcher)",
        )
        require(self.backoff_s >= 0, self, "backoff_s", self.backoff_s, "must be >= 0")
