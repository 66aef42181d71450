"""The HAProxy configuration of the queue front, rendered from a :class:`FrontConfig` (pure).

One frontend speaks HTTP/2 (gRPC), over TLS when configured, and forwards to the upstream
``slimrank serve`` over HTTP/2 (TLS with the server's certificate verified when configured).
``/slimrank.v1.Recommender/`` calls go to a backend whose servers (one, or one per worker
process on its own port) each take at most ``in_flight`` of them at once (``maxconn``; a
call goes to the server with the fewest); the next ones wait in HAProxy's queue. A call
that finds ``queue`` calls already waiting, or that has waited ``queue_timeout_ms``, is
answered by HAProxy itself with a trailers-only gRPC response: RESOURCE_EXHAUSTED and the
server's own retry details (a server HAProxy cannot reach is UNAVAILABLE, as before). So the
front admits what the server finishes, whatever the machine's speed that hour, and the wait
of an admitted call is bounded by the calls ahead of it. Every other path goes to a second
backend without a limit. Each Recommender call's outcome is logged as one syslog datagram to
``log_port`` on loopback, which the runner counts into ``slimrank_front_calls_total``.
"""

from __future__ import annotations

from slimrank.front.config import FrontConfig
from slimrank.front.nginx_conf import LOG_TAG
from slimrank.front.refusal import refusal_headers
from slimrank.serving.aio_engine import RECOMMENDER_PREFIX

LIMITED = "slimrank_limited"
# One line per call: refused by the front (0: no; 1: the queue was full; 2: waited the queue's
# timeout), HTTP status, the server's grpc-status if it came in the headers (a trailers-only
# answer: its refusals), and HAProxy's termination state.
LOG_FORMAT = "%[var(txn.refused)] %ST %[var(txn.grpc_status)] %tsc"
FRONT_PEM = "front.pem"
UPSTREAM_PEM = "upstream.pem"


def combined_pems(config: FrontConfig) -> dict[str, tuple[str, str]]:
    """The PEM files HAProxy reads, each a certificate chain followed by its key (HAProxy
    2.6 takes both from one file): name in the front's directory -> (cert, key)."""
    pems = {}
    if config.tls is not None:
        pems[FRONT_PEM] = (config.tls.cert, config.tls.key)
    if config.upstream_cert is not None and config.upstream_key is not None:
        pems[UPSTREAM_PEM] = (config.upstream_cert, config.upstream_key)
    return pems


def render(config: FrontConfig, prefix: str, port: int, log_port: int) -> str:
    """Return haproxy.cfg for ``config``, listening on ``port`` (the resolved one, never 0),
    with its combined PEM files (:func:`combined_pems`) under ``prefix`` and the call log
    sent to ``log_port``."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port}: the front needs a resolved port in [1, 65535]")
    if config.in_flight is None:
        raise ValueError("the HAProxy front needs in_flight (a rate is nginx's)")
    refusal = " ".join(f'hdr {name} "{value}"' for name, value in refusal_headers(config))
    listen_tls, server_tls = _tls_options(config, prefix)
    if len(config.upstreams) == 1:
        # One server: a failed connection is answered at once (UNAVAILABLE), not retried.
        retry_lines = "  retries 0"
        check = ""
    else:
        # Several: a call whose connection failed goes to another server (before anything
        # was sent), and a server that stops accepting connections is taken out by its
        # check, so that `leastconn` does not keep choosing the dead one.
        retry_lines = "  retries 1\n  retry-on conn-failure\n  option redispatch 1"
        check = " check inter 1s fall 2 rise 1"
    refused = "{ var(txn.refused) -m int 1 }"
    timed_out = "{ var(txn.refused) -m int 2 }"
    # HAProxy answers a call whose queue wait ran out with 503 and no server; an unreachable
    # server's 503 names its server. Only the first becomes the front's refusal.
    timeout_rules = "\n".join(
        [
            "  http-error status 503",
            # (With every server's check failing, "no server available" has none either.)
            "  http-after-response set-var(txn.refused) int(2) if { status 503 } "
            f"!{{ srv_id -m found }} {{ nbsrv({LIMITED}) gt 0 }}",
            f"  http-after-response set-status 200 if {timed_out}",
            f"  http-after-response set-header content-type application/grpc if {timed_out}",
            *(
                f'  http-after-response set-header {name} "{value}" if {timed_out}'
                for name, value in refusal_headers(config)
            ),
            f"  http-after-response del-header content-length if {timed_out}",
        ]
    )
    limited = "\n".join(
        f"  server slimrank{i} {address} proto h2 maxconn {config.in_flight}{check}{server_tls}"
        for i, address in enumerate(config.upstreams)
    )
    open_ = "\n".join(
        f"  server slimrank{i} {address} proto h2{check}{server_tls}"
        for i, address in enumerate(config.upstreams)
    )
    return f"""# slimrank front (queue): rendered by `slimrank front`; flags change it, not edits.
global
  nbthread 1
  log 127.0.0.1:{log_port} len 1024 local0 info
  log-tag {LOG_TAG}
  tune.h2.max-concurrent-streams 1024
  # Headers up to about 31 kB reach the server, whose gRPC answers metadata over its own
  # limit (8-16 kB) with RESOURCE_EXHAUSTED; at the 16 kB default HAProxy would end the
  # caller's whole connection (GOAWAY) instead.
  tune.bufsize 32768

defaults
  mode http
  log global
{retry_lines}
  timeout connect 1s
  # Health.Watch streams stay open for long silences.
  timeout client 1h
  timeout server 1h
  timeout queue {config.queue_timeout_ms}ms

frontend slimrank_front
  bind {config.host}:{port} proto h2{listen_tls}
  log-format "{LOG_FORMAT}"
  acl recommender path_beg {RECOMMENDER_PREFIX}
  # Full: `queue` calls already wait for one of the server's `in_flight` places.
  acl full queue({LIMITED}) ge {config.queue}
  http-request set-log-level silent unless recommender
  http-request set-var(txn.refused) int(0)
  http-request set-var(txn.refused) int(1) if recommender full
  http-request return status 200 {refusal} if {refused}
  http-after-response set-header content-type application/grpc if {refused}
  http-after-response del-header content-length if {refused}
  http-request set-header X-Forwarded-For %[src]
  http-response set-var(txn.grpc_status) res.hdr(grpc-status)
  use_backend {LIMITED} if recommender
  default_backend slimrank_open

backend {LIMITED}
  # Each server (a process on its own port, or one server) takes `in_flight` calls at once;
  # a call goes to the one with the fewest, and waits in the queue while all are full.
  balance leastconn
{timeout_rules}
{limited}

backend slimrank_open
{open_}
"""


def _tls_options(config: FrontConfig, prefix: str) -> tuple[str, str]:
    """The bind line's TLS options and the server lines'."""
    listen = ""
    if config.tls is not None:
        listen = f" ssl crt {prefix}/{FRONT_PEM} alpn h2 ssl-min-ver TLSv1.2"
        if config.tls.client_ca:
            listen += f" ca-file {config.tls.client_ca} verify required"
    if not config.upstream_ca:
        return listen, ""
    name = config.upstream_name or config.upstream_host
    server = (
        f" ssl verify required ca-file {config.upstream_ca} verifyhost {name}"
        f" sni str({name}) alpn h2 ssl-min-ver TLSv1.2"
    )
    if config.upstream_cert:
        server += f" crt {prefix}/{UPSTREAM_PEM}"
    return listen, server


def outcome(log_line: str) -> str | None:
    """Return a call's outcome from one syslog datagram of the front's log: ``refused`` (by
    the front: its queue was full), ``queue_timeout`` (refused by the front after waiting in
    the queue for its timeout), ``server_refused`` (forwarded, and the server answered
    RESOURCE_EXHAUSTED itself), ``upstream_error`` (HAProxy could not reach the server: HTTP
    502/503/504, UNAVAILABLE to the caller; or the server aborted the call or timed out after
    its headers: termination state ``S`` or ``s``), ``other`` (another HTTP status, or the
    caller went away first, or HAProxy ended the call for another reason) or ``forwarded``;
    None for a line that is not one."""
    fields = log_line.rsplit(": ", 1)[-1].split()
    if len(fields) != 4 or fields[0] not in ("0", "1", "2") or not fields[1].lstrip("-").isdigit():
        return None
    refused, status, header_status, termination = fields
    if refused == "1":
        return "refused"
    if refused == "2":
        return "queue_timeout"
    ended_by = termination[:1]  # "-": the call ended normally
    if status in ("502", "503", "504") or ended_by in ("S", "s"):
        return "upstream_error"
    if status != "200" or ended_by != "-":
        return "other"
    if header_status == "8":
        return "server_refused"
    return "forwarded"
