"""The front's configuration: where it listens, the server it forwards to, what it admits."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re

from slimrank.config import Config, require
from slimrank.serving.security import TLSConfig

# What may go into nginx.conf or haproxy.cfg unquoted: no whitespace, quotes, ';', braces,
# variables or HAProxy's '%' sample expressions.
_CONF_SAFE = re.compile(r"[^\s'\";{}$#%\\]+")

_UPSTREAM_PATHS = ("upstream_ca", "upstream_cert", "upstream_key")

# A DNS name, an IPv4 address or a bracketed IPv6 address; and host:port.
_HOST = r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+"
_ADDRESS = re.compile(rf"^({_HOST}):(\d{{1,5}})$")


def nginx_rate(calls_per_s: float) -> str | None:
    """Return ``calls_per_s`` as nginx writes a rate (whole calls a second, ``400r/s``, or a
    minute, ``90r/m``), or None if it is neither (nginx reads whole numbers only)."""
    if not math.isfinite(calls_per_s) or calls_per_s <= 0:
        return None
    if calls_per_s >= 1 and float(calls_per_s).is_integer():
        return f"{int(calls_per_s)}r/s"
    per_minute = round(calls_per_s * 60, 9)
    if per_minute >= 1 and float(per_minute).is_integer():
        return f"{int(per_minute)}r/m"
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def split_address(address: str) -> tuple[str, int] | None:
    """Return ``(host, port)`` of ``host:port`` (IPv6 in brackets), or None if it is not one."""
    match = _ADDRESS.match(address)
    if match is None or not 0 < int(match[2]) < 65536:
        return None
    return match[1], int(match[2])


def _distinct(addresses: list[str]) -> set[tuple[str, int]]:
    """The different servers among ``host:port`` addresses: hosts compared case-insensitively
    and ports as numbers (``A:50051`` and ``a:050051`` are one server)."""
    return {
        (parsed[0].lower(), parsed[1])
        for parsed in map(split_address, addresses)
        if parsed is not None
    }


@dataclasses.dataclass(frozen=True)
class FrontConfig(Config):
    """A front that refuses Recommender calls past its limit itself, with RESOURCE_EXHAUSTED.

    One of two limits. ``rate``: nginx admits at most ``rate`` calls a second (plus a burst of
    ``burst`` calls at once), whatever the server could do at the moment. ``in_flight``:
    HAProxy lets at most ``in_flight`` calls be at the server at once and up to ``queue``
    more wait in its own queue (for at most ``queue_timeout_ms``, then refused too); a call
    that finds the queue full is refused at once. The second follows the server's speed: it
    admits what the server finishes, more in a fast hour and less in a slow one.
    ``burst``, ``worker_processes``, ``max_message_bytes`` and ``upstream_keepalive`` are
    nginx's (the rate front's); HAProxy runs one thread and leaves the size limit to the
    server.

    The refusal carries what the server's own refusal carries: a ``google.rpc.RetryInfo`` of
    ``retry_after_s`` and the ``grpc-retry-pushback-ms`` trailer, so clients back off the same
    way. Health and Admin calls are forwarded without a limit (a probe or a reload is never
    refused). ``port`` 0 picks a free port; ``metrics_port`` None serves no /metrics.
    ``worker_processes`` nginx workers share one limit (nginx keeps it in shared memory).

    TLS, each side on its own: ``tls`` (the server's own :class:`TLSConfig`: certificate, key
    and, for mutual TLS, the CA client certificates must be signed by) makes the front's
    listener speak TLS as ``slimrank serve`` does. ``upstream_ca`` makes the front speak TLS to
    the server and verify its certificate against that CA for the name ``upstream_name``
    (None: the upstream's host; give a DNS name of the certificate when the upstream is an
    IP address); ``upstream_cert``/``upstream_key`` are the front's client certificate, for a
    server that requires mutual TLS.
    """

    rate: float | None = None
    in_flight: int | None = None
    queue: int = 2
    queue_timeout_ms: int = 50
    upstream: str = "127.0.0.1:50051"
    host: str = "127.0.0.1"
    port: int = 50050
    burst: int = 25
    retry_after_s: float = 0.05
    max_message_bytes: int = 1 << 20
    worker_processes: int = 1
    upstream_keepalive: int = 64
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    tls: TLSConfig | None = None
    upstream_ca: str | None = None
    upstream_cert: str | None = None
    upstream_key: str | None = None
    upstream_name: str | None = None

    @property
    def engine(self) -> str:
        """The proxy that runs this front: ``nginx`` for a rate, ``haproxy`` for a queue."""
        return "nginx" if self.in_flight is None else "haproxy"

    @property
    def upstreams(self) -> list[str]:
        """The servers' ``host:port`` addresses: ``upstream`` is one, or several separated by
        commas (one server's worker processes on their own ports, ``--worker-ports``)."""
        return [part.strip() for part in self.upstream.split(",")]

    @property
    def upstream_host(self) -> str:
        """The first server's host, as ``upstream`` names it (IPv6 in brackets)."""
        address = split_address(self.upstreams[0])
        return "" if address is None else address[0]

    def __post_init__(self) -> None:
        require(
            (self.rate is None) != (self.in_flight is None),
            self,
            "rate",
            self.rate,
            "give either a rate (nginx admits so many calls a second) or in_flight (HAProxy "
            "lets so many calls be at the server and queues a few more), not both or neither",
        )
        require(
            self.rate is None or nginx_rate(self.rate) is not None,
            self,
            "rate",
            self.rate,
            "must be whole calls per second (400), or per minute (0.5 = 30 a minute): "
            "nginx reads whole numbers only",
        )
        require(
            self.in_flight is None or 1 <= self.in_flight <= 10_000,
            self,
            "in_flight",
            self.in_flight,
            "must be in [1, 10000]",
        )
        require(1 <= self.queue <= 10_000, self, "queue", self.queue, "must be in [1, 10000]")
        require(
            1 <= self.queue_timeout_ms <= 60_000,
            self,
            "queue_timeout_ms",
            self.queue_timeout_ms,
            "must be in [1, 60000] (milliseconds)",
        )
        require(
            self.in_flight is None or self.worker_processes == 1,
            self,
            "worker_processes",
            self.worker_processes,
            "is for the rate front's nginx; the queue front (in_flight) runs one HAProxy thread",
        )
        require(
            all(split_address(part) is not None for part in self.upstreams)
            and len(_distinct(self.upstreams)) == len(self.upstreams),
            self,
            "upstream",
            self.upstream,
            "must be host:port with a port in [1, 65535] (IPv6 in brackets), or several "
            "different ones separated by commas",
        )
        require(0 <= self.port < 65536, self, "port", self.port, "must be in [0, 65535]")
        require(self.burst >= 0, self, "burst", self.burst, "must be >= 0")
        require(
            math.isfinite(self.retry_after_s) and 0 <= self.retry_after_s <= 3600,
            self,
            "retry_after_s",
            self.retry_after_s,
            "must be in [0, 3600] seconds",
        )
        require(
            self.max_message_bytes >= 1024,
            self,
            "max_message_bytes",
            self.max_message_bytes,
            "must be >= 1024",
        )
        require(
            1 <= self.worker_processes <= 64,
            self,
            "worker_processes",
            self.worker_processes,
            "must be in [1, 64]",
        )
        require(
            self.upstream_keepalive >= 1,
            self,
            "upstream_keepalive",
            self.upstream_keepalive,
            "must be >= 1",
        )
        require(
            self.metrics_port is None or 0 <= self.metrics_port < 65536,
            self,
            "metrics_port",
            self.metrics_port,
            "must be None or in [0, 65535]",
        )
        require(
            (self.upstream_cert is None) == (self.upstream_key is None),
            self,
            "upstream_cert",
            self.upstream_cert,
            "upstream_cert and upstream_key go together",
        )
        require(
            self.upstream_cert is None or self.upstream_ca is not None,
            self,
            "upstream_cert",
            self.upstream_cert,
            "needs upstream_ca (a client certificate is sent over TLS only)",
        )
        require(
            self.upstream_ca is None
            or self.upstream_name is not None
            or not _is_ip(self.upstream_host),
            self,
            "upstream_name",
            self.upstream_name,
            f"needed with upstream_ca when the upstream is an IP address ({self.upstream}): "
            "the front checks a certificate's DNS names only; give one the server's carries",
        )
        hosts = {split_address(part)[0] for part in self.upstreams if split_address(part)}
        require(
            self.upstream_ca is None or self.upstream_name is not None or len(hosts) <= 1,
            self,
            "upstream_name",
            self.upstream_name,
            f"needed with upstream_ca when the upstreams have different hosts ({self.upstream}): "
            "the one name every server's certificate carries",
        )
        require(
            self.upstream_name is None or self.upstream_ca is not None,
            self,
            "upstream_name",
            self.upstream_name,
            "needs upstream_ca (the name is checked in the server's certificate)",
        )
        paths = {field: getattr(self, field) for field in _UPSTREAM_PATHS}
        if self.tls is not None:
            tls = self.tls
            paths.update(tls_cert=tls.cert, tls_key=tls.key, tls_client_ca=tls.client_ca)
        for field, value in paths.items():
            require(
                value is None or _CONF_SAFE.fullmatch(value) is not None,
                self,
                field,
                value,
                "must be a path without spaces, quotes, semicolons, braces, $, % or backslashes",
            )
        require(
            self.upstream_name is None
            or re.fullmatch(r"[A-Za-z0-9.-]+", self.upstream_name) is not None,
            self,
            "upstream_name",
            self.upstream_name,
            "must be a DNS name",
        )
        for field in ("host", "metrics_host"):
            value = getattr(self, field)
            require(
                re.fullmatch(_HOST, value) is not None,
                self,
                field,
                value,
                "must be a host name or address (IPv6 in brackets)",
            )
