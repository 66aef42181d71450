"""Serving processes: one server in this process, or N worker processes sharing one port.

:class:`ServeSpec` is everything a server process needs (picklable, so it can be handed to a
spawned worker). :func:`serve_one` loads ``CURRENT``, warms it up, serves with a bundle
watcher until SIGTERM/SIGINT and drains gracefully. :func:`serve_workers` reserves the port
with ``SO_REUSEPORT``, starts N spawned workers that each run ``serve_one`` on it (the kernel
spreads connections among them), serves their merged metrics from one endpoint (Prometheus
multiprocess mode), and on SIGTERM/SIGINT stops them all gracefully.

With several workers each one loads its own snapshot and runs its own watcher, so a new
``CURRENT`` reaches them within one poll interval of each other. ``Admin.Reload`` reaches
only the worker its connection lands on: move ``CURRENT`` (promote / rollback) instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path

from prometheus_client import CollectorRegistry

from slimrank.serving.config import ServerConfig
from slimrank.serving.listen import ListenError, listening
from slimrank.serving.loader import SnapshotLoader, default_loaders
from slimrank.serving.metrics import start_metrics_endpoint
from slimrank.serving.reload import (
    BundleWatcher,
    ReloadConfig,
    bundle_reload_fn,
    load_current,
)
from slimrank.serving.security import AdminAuthInterceptor, TLSConfig, server_credentials
from slimrank.serving.server import (
    STOP_SIGNALS,
    RecommenderFactory,
    SlimrankServer,
    serve_forever,
)
from slimrank.serving.snapshot import SnapshotHolder
from slimrank.serving.stop_request import StopRequest, stop_on

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LOG_FORMAT = "%(levelname)s %(name)s[%(process)d]: %(message)s"
# The loggers whose levels a worker takes from its parent ("": the root).
LOGGERS = ("", "slimrank")
# Seconds a stopping worker gets beyond the server's grace before it is killed.
KILL_AFTER_S = 10.0

# (port, metrics port or None, worker pids) once every server process reports SERVING, and
# the HTTP/JSON port as a fourth argument when that endpoint is on.
OnReady = Callable[..., None]


@dataclasses.dataclass(frozen=True)
class ServeSpec:
    """What one server process serves, and how."""

    bundles: Path
    server: ServerConfig
    reload: ReloadConfig = dataclasses.field(default_factory=ReloadConfig)
    tls: TLSConfig | None = None
    admin_token: str | None = dataclasses.field(default=None, repr=False)
    admin_insecure: bool = False
    # Extra bundle kinds -> loader; module-level functions, so a spawned worker can unpickle them.
    loaders: dict[str, SnapshotLoader] = dataclasses.field(default_factory=dict)
    # Builds the Recommender servicer instead of the default (module-level, like loaders).
    recommender: RecommenderFactory | None = None

    def all_loaders(self) -> dict[str, SnapshotLoader]:
        """Return the built-in loaders with ``loaders`` added (and overriding)."""
        return {**default_loaders(), **self.loaders}


def serve_one(
    spec: ServeSpec,
    on_ready: OnReady | None = None,
    *,
    after_stop: signal.Handlers | None = None,
) -> int:
    """Serve ``spec`` in this process until SIGTERM/SIGINT; return the exit code (0).

    Raises the load error (e.g. ``IntegrityError``) if ``CURRENT`` cannot be served.
    ``after_stop``: the handler of those signals once the server has stopped (see
    :func:`~slimrank.serving.server.serve_forever`).
    """
    loaders = spec.all_loaders()
    holder = SnapshotHolder(load_current(spec.bundles, loaders))
    registry = CollectorRegistry()
    lock = threading.Lock()
    load = bundle_reload_fn(spec.bundles, loaders)
    watchers: list[BundleWatcher] = []

    def ready(server: SlimrankServer, port: int) -> None:
        watcher = BundleWatcher(spec.bundles, holder, load, server.metrics, lock, spec.reload)
        watcher.start()
        watchers.append(watcher)
        if on_ready is not None:
            extra = () if server.http_port is None else (server.http_port,)
            on_ready(port, server.metrics_port, [os.getpid()], *extra)

    try:
        serve_forever(
            spec.server,
            holder,
            registry,
            load,
            ready,
            reload_lock=lock,
            credentials=None if spec.tls is None else server_credentials(spec.tls),
            interceptors=(AdminAuthInterceptor(spec.admin_token, spec.admin_insecure),),
            recommender=spec.recommender,
            after_stop=after_stop,
        )
    finally:
        for watcher in watchers:
            watcher.stop()
    return 0


def _worker_main(
    spec: ServeSpec, reports: multiprocessing.Queue, log_levels: dict[str, int]
) -> None:
    """Entry point of a spawned worker: serve, reporting ``(pid, port or error)`` once.

    ``log_levels`` are the parent's effective levels of the root logger (``""``) and of the
    ``slimrank`` logger: a spawned process starts with logging unconfigured, and the CLI
    sets ``slimrank`` (INFO) apart from the root (WARNING)."""
    logging.basicConfig(level=log_levels.get("", logging.WARNING), format=LOG_FORMAT)
    for name, level in log_levels.items():
        if name:
            logging.getLogger(name).setLevel(level)
    pid = os.getpid()

    def ready(port: int, metrics_port: int | None, pids: list[int], *http: int) -> None:
        reports.put((pid, port))

    try:
        # The parent forwards its SIGTERM to every worker when it stops; when the process
        # group got one too, a worker may already have drained, and with the default handler
        # back the forwarded one killed it (exit code -15, so the parent exited 1).
        code = serve_one(spec, ready, after_stop=signal.SIG_IGN)
    except ListenError as err:  # the parent names the address as one line, exit 2
        reports.put((pid, ListenError(str(err))))
        raise SystemExit(2) from err
    except Exception as err:  # report any start-up failure to the parent, then exit non-zero
        log.exception("worker %d failed", pid)
        reports.put((pid, f"{type(err).__name__}: {err}"))
        raise SystemExit(1) from err
    raise SystemExit(code)


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[int]:
    """Bind (without listening) ``host:port`` with ``SO_REUSEPORT``; yield the bound port.

    Holding the socket keeps port 0's pick for the workers, which bind it with
    ``SO_REUSEPORT`` too; a socket that does not listen is given no connections.
    """
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with listening("gRPC", host, port):
            sock.bind((host.strip("[]"), port))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def _multiproc_dir() -> Path:
    """Return an empty directory for the workers' metric files (``$PROMETHEUS_MULTIPROC_DIR``)."""
    configured = os.environ.get(MULTIPROC_ENV)
    path = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="slimrank-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # files of a previous run would be summed into ours
        stale.unlink()
    return path


def _stop_all(procs: list[BaseProcess], timeout: float) -> None:
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():
            log.error("worker %s did not stop within %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            proc.join(5)


def _await_ready(
    procs: list[BaseProcess], reports: multiprocessing.Queue, stop: StopRequest
) -> list[int] | None:
    """Wait until every worker reports SERVING; None if one failed or a stop was asked.

    A worker that could not listen (its own port, or ``--http-port`` taken by a process
    that is not ours) raises its :class:`ListenError` here, so the CLI names the address.
    """
    ready: list[int] = []
    while len(ready) < len(procs):
        if stop.is_set():
            return None
        try:
            pid, status = reports.get(timeout=0.2)
        except queue.Empty:
            if any(p.exitcode is not None for p in procs):
                log.error("a worker exited before serving")
                return None
            continue
        if isinstance(status, ListenError):
            raise status
        if isinstance(status, str):
            log.error("worker %d could not start: %s", pid, status)
            return None
        ready.append(pid)
    return ready


def serve_workers(
    spec: ServeSpec,
    n: int,
    on_ready: OnReady | None = None,
    own_ports: Sequence[int] | None = None,
) -> int:
    """Serve ``spec`` from ``n`` worker processes on one port until SIGTERM/SIGINT; worker
    ``i`` also listens on ``own_ports[i]`` alone, when given (a front then reaches each
    process on its own).

    Returns 0 after a requested stop, 1 if a worker failed to start or died while serving
    (the others are stopped too, so a supervisor restarts the whole server). Raises
    :class:`ListenError` if the port, or a port a worker listens on, cannot be bound.
    """
    if n < 1:
        raise ValueError(f"serve_workers: n={n!r} must be >= 1")
    if own_ports is not None and len(own_ports) != n:
        raise ValueError(f"serve_workers: {len(own_ports)} own ports for {n} workers")
    metrics_dir = _multiproc_dir()
    os.environ[MULTIPROC_ENV] = str(metrics_dir)  # read by prometheus_client in each worker
    from prometheus_client import multiprocess

    signals = contextlib.ExitStack()  # handlers put back last, after the workers stopped
    stop = signals.enter_context(stop_on(STOP_SIGNALS))
    endpoint = None
    procs: list[BaseProcess] = []
    code = 1
    try:
        with reserve_port(spec.server.host, spec.server.port) as port:
            worker_config = dataclasses.replace(
                spec.server, port=port, so_reuseport=True, metrics_port=None
            )
            worker_spec = dataclasses.replace(spec, server=worker_config)
            ctx = multiprocessing.get_context("spawn")  # no fork after grpc or faiss threads
            reports = ctx.Queue()
            levels = {name: logging.getLogger(name).getEffectiveLevel() for name in LOGGERS}
            for i in range(n):
                own = None if own_ports is None else own_ports[i]
                config = dataclasses.replace(worker_config, own_port=own)
                proc = ctx.Process(
                    target=_worker_main,
                    args=(dataclasses.replace(worker_spec, server=config), reports, levels),
                    name=f"slimrank-worker-{i}",
                )
                proc.start()
                procs.append(proc)
            pids = _await_ready(procs, reports, stop)
            if pids is None and stop.is_set():
                code = 0  # asked to stop while starting
            elif pids is not None:
                if spec.server.metrics_port is not None:
                    registry = CollectorRegistry()
                    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
                    endpoint = start_metrics_endpoint(
                        spec.server.metrics_host, spec.server.metrics_port, registry
                    )
                log.info("%d workers serving on %s:%d", n, spec.server.host, port)
                if on_ready is not None:
                    mport = None if endpoint is None else endpoint.port
                    http = spec.server.http_port  # fixed: the CLI refuses 0 with --workers
                    extra = () if http is None else (http,)
                    on_ready(port, mport, sorted(pids), *extra)
                while not stop.wait(0.5):
                    dead = [p for p in procs if p.exitcode is not None]
                    if dead:
                        log.error(
                            "worker %s exited with %s; stopping", dead[0].pid, dead[0].exitcode
                        )
                        break
                else:
                    code = 0
    finally:
        _stop_all(procs, spec.server.grace_s + KILL_AFTER_S)
        for proc in procs:
            if proc.pid is not None:
                multiprocess.mark_process_dead(proc.pid, str(metrics_dir))
        if endpoint is not None:
            endpoint.close()
        signals.close()
    if code == 0 and any(p.exitcode != 0 for p in procs):
        log.error("worker exit codes: %s", [p.exitcode for p in procs])
        code = 1
    return code
