"""The nginx configuration of the front, rendered from a :class:`FrontConfig` (pure: no I/O).

One server block speaks HTTP/2 (gRPC), over TLS when configured, and forwards to the
upstream ``slimrank serve`` (``grpc_pass`` over a pool of kept-alive connections, TLS with
the server's certificate verified when configured). ``/slimrank.v1.Recommender/`` calls
pass nginx's ``limit_req`` (a leaky bucket of ``rate`` calls a second; ``burst`` calls over
it go through at once, ``nodelay``), and a call over the limit is answered by nginx itself
with a trailers-only gRPC response: status RESOURCE_EXHAUSTED and the same retry details the
server's own refusal sends. Every other path is forwarded unlimited. A request body over
``max_message_bytes`` (and its 5-byte frame header) is answered by nginx too, on any path,
with a trailers-only RESOURCE_EXHAUSTED naming the limit and a negative retry pushback, so
that no gRPC retry policy sends it again (nginx's own HTTP 413 would reach a gRPC caller as
UNKNOWN). Each Recommender call's outcome (with the server's gRPC status, so that its
refusals are seen too) is logged as one syslog datagram to ``log_port`` on loopback, which
the runner counts into ``slimrank_front_calls_total`` (UDP: nginx never waits for the
reader).
"""

from __future__ import annotations

from slimrank.front.config import FrontConfig, nginx_rate
from slimrank.front.refusal import RATE_MESSAGE, refusal_headers, too_large_headers
from slimrank.serving.aio_engine import RECOMMENDER_PREFIX

REFUSAL_MESSAGE = RATE_MESSAGE
LOG_TAG = "slimrank_front"
TOO_LARGE = "TOO_LARGE"  # first field of the log line of a Recommender call over the size limit
GRPC_FRAME_HEADER_BYTES = 5


def render(config: FrontConfig, prefix: str, port: int, log_port: int) -> str:
    """Return nginx.conf for ``config``, listening on ``port`` (the resolved one, never 0),
    with its temporary files and pid under ``prefix`` and the call log sent to ``log_port``."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port}: the front needs a resolved port in [1, 65535]")
    if config.rate is None:
        raise ValueError("the nginx front needs a rate (in_flight is HAProxy's)")
    headers = _add_headers(refusal_headers(config))
    too_large = _add_headers(too_large_headers(config))
    tmp = f"{prefix}/tmp"
    # nginx refuses burst=0; without the parameter the burst is 0.
    burst = f" burst={config.burst} nodelay" if config.burst else ""
    admitted = nginx_rate(config.rate)
    call_log, too_large_log = (
        f"access_log syslog:server=127.0.0.1:{log_port},tag={LOG_TAG},nohostname {fmt};"
        for fmt in ("slimrank_front", "slimrank_front_too_large")
    )
    listen_tls, upstream_tls, scheme = _tls_lines(config)
    servers = "\n".join(f"    server {address};" for address in config.upstreams)
    return f"""# slimrank front: rendered by `slimrank front`; do not edit (flags change it).
worker_processes {config.worker_processes};
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server_tokens off;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  # The server's own status: in the headers of a trailers-only answer (its refusals), else
  # in the trailers.
  log_format slimrank_front
    '$limit_req_status $status $upstream_http_grpc_status $upstream_trailer_grpc_status';
  log_format slimrank_front_too_large '{TOO_LARGE} 413 - -';
  # One bucket for every caller: the limit protects the server, whoever calls.
  limit_req_zone $server_name zone=slimrank_calls:1m rate={admitted};
  limit_req_status 429;
  limit_req_log_level info;
  upstream slimrank {{
{servers}
    keepalive {config.upstream_keepalive};
  }}
  server {{
    listen {config.host}:{port}{"" if config.tls is None else " ssl"} http2 reuseport;
    server_name slimrank_front;{listen_tls}{upstream_tls}
    http2_max_concurrent_streams 1024;
    # Header fields up to 32 kB reach the server, whose gRPC answers metadata over its own
    # limit (8-16 kB) with RESOURCE_EXHAUSTED; at the 8 kB default nginx would end the
    # caller's whole connection (GOAWAY) instead.
    large_client_header_buffers 4 32k;
    # A gRPC body is the message and a 5-byte frame header.
    client_max_body_size {config.max_message_bytes + GRPC_FRAME_HEADER_BYTES};
    grpc_set_header X-Forwarded-For $remote_addr;
    location {RECOMMENDER_PREFIX} {{
      limit_req zone=slimrank_calls{burst};
      error_page 429 = @refused;
      error_page 413 = @too_large_call;
      {call_log}
      grpc_pass {scheme}://slimrank;
    }}
    location / {{
      error_page 413 = @too_large;
      # Health.Watch streams stay open: not cut after nginx's default 60 s of silence.
      grpc_read_timeout 1h;
      grpc_send_timeout 1h;
      grpc_pass {scheme}://slimrank;
    }}
    location @refused {{
      default_type application/grpc;
{headers}
      {call_log}
      return 200;
    }}
    location @too_large_call {{
      default_type application/grpc;
{too_large}
      {too_large_log}
      return 200;
    }}
    location @too_large {{
      default_type application/grpc;
{too_large}
      return 200;
    }}
  }}
}}
"""


def _add_headers(headers: list[tuple[str, str]]) -> str:
    """nginx ``add_header`` lines (sent with any status) for ``headers``."""
    return "\n".join(f'      add_header {name} "{value}" always;' for name, value in headers)


def _tls_lines(config: FrontConfig) -> tuple[str, str, str]:
    """The listener's TLS directives, the upstream's, and the ``grpc_pass`` scheme."""
    protocols = "TLSv1.2 TLSv1.3"
    listen = ""
    if config.tls is not None:
        listen += (
            f"\n    ssl_certificate {config.tls.cert};"
            f"\n    ssl_certificate_key {config.tls.key};"
            f"\n    ssl_protocols {protocols};"
        )
        if config.tls.client_ca:
            listen += (
                f"\n    ssl_client_certificate {config.tls.client_ca};\n    ssl_verify_client on;"
            )
    if not config.upstream_ca:
        return listen, "", "grpc"
    name = config.upstream_name or config.upstream_host
    upstream = (
        f"\n    grpc_ssl_trusted_certificate {config.upstream_ca};"
        "\n    grpc_ssl_verify on;"
        f"\n    grpc_ssl_name {name};"
        "\n    grpc_ssl_server_name on;"
        f"\n    grpc_ssl_protocols {protocols};"
    )
    if config.upstream_cert:
        upstream += (
            f"\n    grpc_ssl_certificate {config.upstream_cert};"
            f"\n    grpc_ssl_certificate_key {config.upstream_key};"
        )
    return listen, upstream, "grpcs"


def outcome(log_line: str) -> str | None:
    """Return a call's outcome from one syslog datagram of the front's log: ``refused`` (by
    the front, over its rate), ``server_refused`` (forwarded, and the server answered
    RESOURCE_EXHAUSTED itself), ``upstream_error`` (nginx could not reach the server: HTTP
    502/504, which the caller sees as UNAVAILABLE), ``other`` (nginx answered itself
    otherwise: a request over the size limit, or HTTP 499 when the caller went away) or
    ``forwarded``; None for a line that is not one."""
    fields = log_line.rsplit(": ", 1)[-1].split()
    if len(fields) != 4 or not fields[1].isdigit():
        return None
    limit, status, header_status, trailer_status = fields
    if limit == "REJECTED":
        return "refused"
    if limit == TOO_LARGE:
        return "other"
    if status in ("502", "503", "504"):
        return "upstream_error"
    if status != "200":
        return "other"
    if "8" in (header_status, trailer_status):
        return "server_refused"
    return "forwarded"
