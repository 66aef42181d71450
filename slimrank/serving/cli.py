"""``slimrank serve``: serve the bundle ``CURRENT`` names, follow ``CURRENT``, stop on SIGTERM.

Once every server process reports SERVING, one line goes to stdout for scripts to read::

    serving on 127.0.0.1:50051 metrics 127.0.0.1:9100 pids 1234 http 127.0.0.1:8080

(``metrics -`` when there is no metrics endpoint; ``http ...`` only with --http-port).
SIGTERM or SIGINT drain in-flight calls for ``--grace`` seconds and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from slimrank.bundle.root import ROOT_HELP, bundles_root
from slimrank.serving.config import ReloadConfig, ServerConfig

if TYPE_CHECKING:
    from slimrank.serving.security import TLSConfig
    from slimrank.serving.workers import ServeSpec

log = logging.getLogger(__name__)

ENV_ADMIN_TOKEN_FILE = "SLIMRANK_ADMIN_TOKEN_FILE"
# Threads beyond max_inflight, so that shed calls, health checks and admin calls get one.
SPARE_THREADS = 4
# The wait a model call may be expected to have before it is refused: with the handler time
# on top, accepted calls stay within the 20 ms p99 the benchmark holds the server to.
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_BURST_WAIT_MS = 30.0
DEFAULT_RELOAD_WAIT_MS = 250.0
# Model calls on the event loop: the most calls held within 10 ms on the ml-100k bundle, one
# process or two (bench/results/serving_modes.md). ServerConfig keeps 1 thread for embedders
# whose handlers may block, which on the loop would stall every call.
DEFAULT_HANDLER_THREADS = 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` and ``query`` commands."""
    from slimrank.serving import query

    defaults = ServerConfig()
    reload_defaults = ReloadConfig()
    p = sub.add_parser(
        "serve",
        help="serve the CURRENT bundle over gRPC and follow CURRENT",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundles", type=Path, help=ROOT_HELP)
    p.add_argument("--host", default=defaults.host, help="gRPC bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port, 0 picks one (%(default)s)")
    p.add_argument("--metrics-host", default=defaults.metrics_host, help="/metrics bind address")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9100,
        help="/metrics port, 0 picks one, -1 turns it off (default %(default)s)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve the HTTP/JSON API (POST /v1/recommend, /v1/search) on this port, "
        "0 picks one (default: off)",
    )
    p.add_argument(
        "--http-host",
        default=defaults.http_host,
        help="HTTP/JSON bind address (default %(default)s)",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="server processes sharing the port (default 1)"
    )
    p.add_argument(
        "--worker-ports",
        type=int,
        metavar="BASE",
        help="worker i also listens on BASE+i alone (i = 0..N-1), so that a front caps the "
        "calls at each process: slimrank front --in-flight 2 --upstream H:BASE,H:BASE+1",
    )
    p.add_argument("--reflection", action="store_true", help="enable gRPC server reflection")
    p.add_argument(
        "--max-inflight",
        type=int,
        default=defaults.max_inflight,
        help="model calls run at once per process; more are shed (default %(default)s)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=DEFAULT_MAX_WAIT_MS,
        help="refuse a model call when the calls in progress are expected to keep it waiting "
        "longer than this; 0: only --max-inflight bounds them (default %(default)s)",
    )
    p.add_argument(
        "--burst-wait-ms",
        type=float,
        default=DEFAULT_BURST_WAIT_MS,
        help="until calls have been waiting this long without a break, let them wait up to "
        "this instead of --max-wait-ms: a burst is let through, a standing queue is cut; 0: "
        "--max-wait-ms always (default %(default)s)",
    )
    p.add_argument(
        "--burst-recovery-ms",
        type=float,
        default=1000 * defaults.burst_recovery_s,
        help="after calls waited --burst-wait-ms without a break (overload), the burst "
        "allowance comes back once none have for this long (default %(default)s)",
    )
    p.add_argument(
        "--reload-wait-ms",
        type=float,
        default=DEFAULT_RELOAD_WAIT_MS,
        help="while a bundle loads (and for 0.5 s after), or while the calls offered take "
        "less than --overload-fraction of the server, let calls wait up to this: the queue a "
        "reload, a burst or a freeze causes is worked off, not refused; 0: no change "
        "(default %(default)s)",
    )
    p.add_argument(
        "--overload-fraction",
        type=float,
        default=defaults.overload_fraction,
        help="a queue is overload only when the model calls offered over the last 0.2 s take "
        "at least this share of the server's capacity (their rate times the measured cost "
        "of one); below it a queue may wait up to --reload-wait-ms; 0: every standing queue "
        "is overload (default %(default)s)",
    )
    p.add_argument(
        "--freeze-watch-ms",
        type=float,
        default=1000 * defaults.freeze_watch_s,
        help="a thread wakes this often; a wake-up over 50 ms after the last one means the "
        "process stood still, and the calls that queued meanwhile may wait that long instead "
        "of being refused as overload; 0: no watch (default %(default)s)",
    )
    p.add_argument(
        "--core-queue-refresh-ms",
        type=float,
        default=defaults.core_queue_refresh_s * 1000,
        help="count the calls queued in gRPC's core (read from channelz at most this often) "
        "as ahead of a new call for --max-wait-ms; < 0: do not (default %(default)s)",
    )
    p.add_argument(
        "--handler-threads",
        type=int,
        default=DEFAULT_HANDLER_THREADS,
        help="threads per process running model calls; 0 runs them on the event loop "
        "(default %(default)s)",
    )
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None if defaults.switch_interval_s is None else 1000 * defaults.switch_interval_s,
        help="the GIL switch interval (sys.setswitchinterval), so the event loop admits calls "
        "promptly while a handler thread computes (default: %(default)s)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=defaults.grace_s,
        help="seconds in-flight calls get at shutdown (default %(default)s)",
    )
    p.add_argument(
        "--max-connection-idle",
        type=float,
        default=defaults.max_connection_idle_s,
        help="seconds a connection may stay without calls before it is closed (%(default)s)",
    )
    p.add_argument(
        "--max-connection-age",
        type=float,
        default=defaults.max_connection_age_s,
        help="seconds before any connection is closed (after a grace for its calls), so "
        "clients spread over new replicas; 0: never (default %(default)s)",
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=reload_defaults.poll_interval_s,
        help="seconds between reads of CURRENT, 0 turns the watcher off (default %(default)s)",
    )
    p.add_argument(
        "--reload-backoff",
        type=float,
        default=reload_defaults.backoff_s,
        help="seconds before a failed CURRENT is tried again (default %(default)s)",
    )
    p.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM); enables TLS")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument(
        "--tls-client-ca", type=Path, help="CA (PEM) that client certificates must chain to (mTLS)"
    )
    p.add_argument(
        "--admin-token-file",
        type=Path,
        default=None,
        help=f"file holding the Admin bearer token (default: ${ENV_ADMIN_TOKEN_FILE})",
    )
    p.add_argument(
        "--admin-insecure",
        action="store_true",
        help="without a token, open the Admin service to anyone (default: refuse it)",
    )
    p.set_defaults(func=cmd_serve, parser=p)
    query.register(sub)


def _wait_bound_s(parser: argparse.ArgumentParser, flag: str, ms: float) -> float | None:
    """Return a millisecond flag (a wait bound, the freeze watch's interval) in seconds: 0
    turns it off (None), and a negative value, a typo rather than a wish, is an error naming
    the flag."""
    if not math.isfinite(ms) or ms < 0:
        parser.error(f"{flag} {ms:g}: must be a finite number >= 0 (0: off)")
    return ms / 1000 if ms > 0 else None


def tls_from_args(
    parser: argparse.ArgumentParser, cert: Path | None, key: Path | None, client_ca: Path | None
) -> TLSConfig | None:
    """Return the TLS config of a listener's ``--tls-cert``, ``--tls-key`` and
    ``--tls-client-ca`` (None without them); exits with a usage error naming the flags when
    they do not go together or a file is missing. ``slimrank serve`` and ``slimrank front``
    take the same three."""
    from slimrank.serving.security import TLSConfig, check_tls_files

    if (cert is None) != (key is None):
        parser.error("--tls-cert and --tls-key go together")
    if client_ca is not None and cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if cert is None or key is None:
        return None
    try:
        tls = TLSConfig(str(cert), str(key), None if client_ca is None else str(client_ca))
        check_tls_files(tls)
        return tls
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def _spec_from_args(args: argparse.Namespace) -> ServeSpec:
    """Return the serve spec the arguments describe; exits with a usage error on a bad one."""
    from slimrank.serving.security import read_token
    from slimrank.serving.workers import ServeSpec

    parser: argparse.ArgumentParser = args.parser
    tls = tls_from_args(parser, args.tls_cert, args.tls_key, args.tls_client_ca)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be >= 1")
    max_wait_s = _wait_bound_s(parser, "--max-wait-ms", args.max_wait_ms)
    burst_wait_s = _wait_bound_s(parser, "--burst-wait-ms", args.burst_wait_ms)
    reload_wait_s = _wait_bound_s(parser, "--reload-wait-ms", args.reload_wait_ms)
    if args.http_port == 0 and args.workers > 1:
        parser.error("--http-port 0 with --workers: give a fixed port the workers can share")
    own_ports = _worker_ports(parser, args)
    token_file = args.admin_token_file or os.environ.get(ENV_ADMIN_TOKEN_FILE)
    if token_file and args.admin_insecure:
        parser.error("--admin-insecure and an admin token exclude each other")
    try:
        token = read_token(token_file) if token_file else None
        server = ServerConfig(
            host=args.host,
            port=args.port,
            handler_threads=args.handler_threads,
            max_wait_s=max_wait_s,
            burst_wait_s=burst_wait_s,
            reload_wait_s=reload_wait_s,
            overload_fraction=args.overload_fraction,
            burst_recovery_s=args.burst_recovery_ms / 1000,
            freeze_watch_s=_wait_bound_s(parser, "--freeze-watch-ms", args.freeze_watch_ms),
            core_queue_refresh_s=(
                args.core_queue_refresh_ms / 1000 if args.core_queue_refresh_ms >= 0 else None
            ),
            switch_interval_s=(
                None if args.switch_interval_ms is None else args.switch_interval_ms / 1000
            ),
            max_inflight=args.max_inflight,
            max_workers=max(ServerConfig.max_workers, args.max_inflight + SPARE_THREADS),
            max_pending_rpcs=max(
                ServerConfig.max_pending_rpcs, 4 * (args.max_inflight + SPARE_THREADS)
            ),
            reflection=args.reflection,
            metrics_host=args.metrics_host,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            grace_s=args.grace,
            http_port=args.http_port,
            http_host=args.http_host,
            max_connection_idle_s=args.max_connection_idle,
            max_connection_age_s=args.max_connection_age or None,
            own_port=None if own_ports is None or args.workers > 1 else own_ports[0],
        )
        reload = ReloadConfig(poll_interval_s=args.poll_interval, backoff_s=args.reload_backoff)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    return ServeSpec(bundles_root(args.bundles), server, reload, tls, token, args.admin_insecure)


def _announce(
    host: str,
    metrics_host: str,
    port: int,
    mport: int | None,
    pids: list[int],
    http: str | None = None,
) -> None:
    metrics = "-" if mport is None else f"{metrics_host}:{mport}"
    pid_list = ",".join(str(p) for p in pids)
    tail = "" if http is None else f" http {http}"
    print(f"serving on {host}:{port} metrics {metrics} pids {pid_list}{tail}", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean stop."""
    from slimrank.serving.workers import serve_one, serve_workers

    spec = _spec_from_args(args)
    if spec.admin_token is None and not spec.admin_insecure:
        log.warning("no admin token: the Admin service is refused (see --admin-token-file)")
    if spec.admin_token is not None and spec.tls is None:
        log.warning(
            "the admin token is accepted over plaintext gRPC: anyone who can see the traffic "
            "can replay it; serve with --tls-cert/--tls-key, or only on a trusted network"
        )

    def ready(port: int, mport: int | None, pids: list[int], http: int | None = None) -> None:
        http_at = None if http is None else f"{spec.server.http_host}:{http}"
        _announce(spec.server.host, spec.server.metrics_host, port, mport, pids, http_at)

    if args.workers == 1:
        return serve_one(spec, ready)
    return serve_workers(spec, args.workers, ready, _worker_ports(args.parser, args))


def _worker_ports(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int] | None:
    """``--worker-ports BASE``: the ports BASE .. BASE+N-1, checked against the others."""
    base = args.worker_ports
    if base is None:
        return None
    ports = list(range(base, base + args.workers))
    if base < 1 or ports[-1] > 65535:
        last = f"BASE+{args.workers - 1}"
        parser.error(f"--worker-ports {base}: BASE .. {last} must be in [1, 65535]")
    taken = {
        "--port": args.port,
        "--metrics-port": args.metrics_port,
        "--http-port": args.http_port,
    }
    for flag, port in taken.items():
        if port in ports:
            parser.error(f"--worker-ports {base}: {port} is also {flag}")
    return ports
