"""``slimrank front``: a proxy in front of the server that refuses model calls past its limit
in C: nginx for a rate (``--rate``), HAProxy for calls in flight and a short queue
(``--in-flight``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimrank.front.config import FrontConfig
from slimrank.serving.cli import tls_from_args

DEFAULTS = FrontConfig(rate=1)
# What --print-config writes for a proxy run by the system: its pid, temporary and combined
# PEM files there, and the call log to the local syslog daemon.
PRINTED_PREFIX = "/var/lib/slimrank-front"
SYSLOG_PORT = 514
TLS_FILES = (
    "--tls-cert",
    "--tls-key",
    "--tls-client-ca",
    "--upstream-tls-ca",
    "--upstream-tls-cert",
    "--upstream-tls-key",
)


def _absolute(path: Path | None) -> str | None:
    """The proxies read relative paths from their own directory: give them absolute ones."""
    return None if path is None else str(path.resolve())


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``front`` subcommand."""
    p = sub.add_parser(
        "front",
        help="run a proxy in front of `slimrank serve`, refusing calls past its limit at once",
        description=(
            "Run a proxy in front of one `slimrank serve`, on the same host, that refuses "
            "Recommender calls past its limit itself with RESOURCE_EXHAUSTED (in about a "
            "millisecond at the median), with the server's retry details; the rest are "
            "forwarded. Health and Admin calls are never limited. Give one limit. "
            "--in-flight N (HAProxy, Debian's haproxy): at most N calls at the server at once "
            "and up to --queue more waiting in the front; a call that finds the queue full is "
            "refused. It admits what the server finishes, so it follows the machine's speed; "
            "N = 2 per server process. --rate R (nginx, Debian's nginx-light): R calls a "
            "second plus a burst of --burst, whatever the machine could do at the moment; set "
            "it to about 1.2x the rate the server holds in a load test (bench/serving.py). "
            "The server's own admission stays on behind either. "
            "Prints `front on HOST:PORT metrics HOST:PORT pid N` once it listens."
        ),
    )
    limit = p.add_mutually_exclusive_group(required=True)
    limit.add_argument(
        "--in-flight",
        type=int,
        help="Recommender calls at the server at once, the rest queued (HAProxy)",
    )
    limit.add_argument("--rate", type=float, help="Recommender calls admitted a second (nginx)")
    p.add_argument(
        "--queue",
        type=int,
        help="with --in-flight: calls that may wait for the server; more are refused "
        f"({DEFAULTS.queue})",
    )
    p.add_argument(
        "--queue-timeout-ms",
        type=int,
        help="with --in-flight: a queued call waits at most this long, then is refused "
        f"({DEFAULTS.queue_timeout_ms})",
    )
    p.add_argument(
        "--burst",
        type=int,
        help=f"with --rate: calls over the rate let through at once ({DEFAULTS.burst})",
    )
    p.add_argument(
        "--upstream", default=DEFAULTS.upstream, help="the server's host:port (%(default)s)"
    )
    p.add_argument("--host", default=DEFAULTS.host, help="bind address (%(default)s)")
    p.add_argument(
        "--port", type=int, default=DEFAULTS.port, help="port, 0 picks one (%(default)s)"
    )
    p.add_argument("--metrics-host", default=DEFAULTS.metrics_host, help="/metrics bind address")
    p.add_argument(
        "--metrics-port", type=int, default=-1, help="/metrics port, 0 picks one; -1: none"
    )
    p.add_argument(
        "--retry-after-ms",
        type=float,
        default=DEFAULTS.retry_after_s * 1000,
        help="the retry delay a refusal asks for (%(default)g)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        help=f"with --rate: largest request forwarded ({DEFAULTS.max_message_bytes}, as the "
        "server's; HAProxy leaves the limit to the server)",
    )
    p.add_argument(
        "--nginx-workers",
        type=int,
        help=f"with --rate: nginx worker processes ({DEFAULTS.worker_processes})",
    )
    p.add_argument("--tls-cert", type=Path, help="the front's certificate chain (PEM): TLS")
    p.add_argument("--tls-key", type=Path, help="the front's private key (PEM)")
    p.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA"
    )
    p.add_argument(
        "--upstream-tls-ca",
        type=Path,
        help="speak TLS to the server and verify its certificate against this CA",
    )
    p.add_argument(
        "--upstream-tls-cert", type=Path, help="the front's client certificate, for mutual TLS"
    )
    p.add_argument("--upstream-tls-key", type=Path, help="its private key")
    p.add_argument(
        "--upstream-tls-name",
        help="the name the server's certificate must carry (default: the --upstream host; "
        "give a DNS name of the certificate when that is an IP address)",
    )
    p.add_argument("--nginx", default="nginx", help="the nginx binary (name or path)")
    p.add_argument("--haproxy", default="haproxy", help="the HAProxy binary (name or path)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to finish calls on stop")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the proxy's config (nginx.conf, or haproxy.cfg with --in-flight; --port "
        "as given, not 0) and exit, for your own proxy",
    )
    p.set_defaults(func=cmd_front, parser=p)


def config_from_args(args: argparse.Namespace) -> FrontConfig:
    """Return the front's config; exits with a usage error naming the flag on a bad value."""
    parser: argparse.ArgumentParser = args.parser
    for flag in TLS_FILES:
        path = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    # Each limit's own flags: refused with the other limit rather than silently ignored.
    own = {
        "--rate": {
            "--burst": ("burst", DEFAULTS.burst),
            "--max-message-bytes": ("max_message_bytes", DEFAULTS.max_message_bytes),
            "--nginx-workers": ("nginx_workers", DEFAULTS.worker_processes),
        },
        "--in-flight": {
            "--queue": ("queue", DEFAULTS.queue),
            "--queue-timeout-ms": ("queue_timeout_ms", DEFAULTS.queue_timeout_ms),
        },
    }
    chosen = "--rate" if args.rate is not None else "--in-flight"
    for limit, flags in own.items():
        for flag, (name, default) in flags.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
            elif limit != chosen:
                parser.error(f"{flag} goes with {limit}, not {chosen}")
    listener = (args.tls_cert, args.tls_key, args.tls_client_ca)
    tls = tls_from_args(parser, *(None if p is None else p.resolve() for p in listener))
    try:
        return FrontConfig(
            rate=args.rate,
            in_flight=args.in_flight,
            queue=args.queue,
            queue_timeout_ms=args.queue_timeout_ms,
            upstream=args.upstream,
            host=args.host,
            port=args.port,
            burst=args.burst,
            retry_after_s=args.retry_after_ms / 1000,
            max_message_bytes=args.max_message_bytes,
            worker_processes=args.nginx_workers,
            metrics_host=args.metrics_host,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            tls=tls,
            upstream_ca=_absolute(args.upstream_tls_ca),
            upstream_cert=_absolute(args.upstream_tls_cert),
            upstream_key=_absolute(args.upstream_tls_key),
            upstream_name=args.upstream_tls_name,
        )
    except ValueError as err:
        field = getattr(err, "field", "")
        flags = {
            "worker_processes": "--nginx-workers",
            "retry_after_s": "--retry-after-ms",
            "upstream_ca": "--upstream-tls-ca",
            "upstream_cert": "--upstream-tls-cert",
            "upstream_key": "--upstream-tls-key",
            "upstream_name": "--upstream-tls-name",
        }
        flag = flags.get(field, "--" + field.replace("_", "-"))
        parser.error(f"{flag}: {err}")
        raise  # unreachable: parser.error exits


def cmd_front(args: argparse.Namespace) -> int:
    """Run the front until SIGTERM/SIGINT; 0 after a clean stop."""
    from slimrank.front import haproxy_conf, nginx_conf
    from slimrank.front.run import run_front

    config = config_from_args(args)
    if args.print_config:
        if config.port == 0:
            args.parser.error("--port 0: --print-config needs a fixed port")
        if config.engine == "nginx":
            print(nginx_conf.render(config, PRINTED_PREFIX, config.port, SYSLOG_PORT), end="")
            return 0
        for name, (cert, key) in haproxy_conf.combined_pems(config).items():
            print(f"# {PRINTED_PREFIX}/{name}: cat {cert} {key} > it (mode 0600)")
        print(haproxy_conf.render(config, PRINTED_PREFIX, config.port, SYSLOG_PORT), end="")
        return 0

    def ready(port: int, metrics_port: int | None, pid: int) -> None:
        metrics = "-" if metrics_port is None else f"{config.metrics_host}:{metrics_port}"
        print(f"front on {config.host}:{port} metrics {metrics} pid {pid}", flush=True)

    binary = args.nginx if config.engine == "nginx" else args.haproxy
    return run_front(config, binary, ready, grace_s=args.grace)
