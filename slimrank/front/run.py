"""Run the front: render the proxy's config (nginx for a rate, HAProxy for a queue) into a
private directory, check it, run the proxy in the foreground in its own process group, count
its call log into Prometheus metrics, and stop it gracefully (then by force, after
``grace_s``).

The thin I/O shell around :mod:`slimrank.front.nginx_conf` and
:mod:`slimrank.front.haproxy_conf`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from slimrank.errors import SlimrankError
from slimrank.front import haproxy_conf, nginx_conf
from slimrank.front.config import FrontConfig
from slimrank.serving.metrics import MetricsEndpoint, start_metrics_endpoint
from slimrank.serving.stop_request import StopRequest, stop_on
from slimrank.serving.workers import reserve_port

log = logging.getLogger(__name__)

# Each front's private directory: its proxy's config, log and the combined PEM files (copies
# of the TLS keys), named after the front's pid so that a later front can tell a dead one's.
DIR_PREFIX = "slimrank-front-"

OUTCOMES = ("forwarded", "refused", "queue_timeout", "server_refused", "upstream_error", "other")
INSTALL_HINTS = {
    "nginx": "install Debian's nginx-light (sudo scripts/install_nginx.sh) or pass --nginx PATH",
    "haproxy": "install Debian's haproxy (sudo scripts/install_haproxy.sh) or pass --haproxy PATH",
}
# The signal that asks each proxy to stop taking calls and finish those in flight.
GRACEFUL_STOP = {"nginx": signal.SIGQUIT, "haproxy": signal.SIGUSR1}
START_TIMEOUT_S = 10.0
KILL_AFTER_S = 5.0  # after the grace and a SIGTERM, SIGKILL the process group
PR_SET_PDEATHSIG = 1
# Resolved here, in the parent: after fork the child only calls it (no dlopen there).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


class FrontError(SlimrankError):
    """The front could not start: its proxy missing or its config refused (a port taken is a
    :class:`~slimrank.serving.listen.ListenError`)."""


def find_proxy(engine: str, binary: str) -> str:
    """Return the path of the ``engine`` binary ``binary`` names (a path or a name on PATH,
    also looked up in /usr/sbin, where Debian puts it and a user's PATH often lacks)."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FrontError(f"{engine} not found ({binary!r}): {INSTALL_HINTS[engine]}")
    return found


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or
    None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")": split after it.
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_tag(pid: int) -> str | None:
    """``<pid>.<start ticks>``: names one process for as long as the machine is up, where a
    pid alone is reused (a container's first process is pid 1 after every restart)."""
    ticks = _start_ticks(pid)
    return None if ticks is None else f"{pid}.{ticks}"


def remove_stale_dirs(root: Path | None = None) -> list[Path]:
    """Remove the private directories (``slimrank-front-<pid>.<start ticks>-*`` under
    ``root``, the temporary directory by default) of fronts killed before they could remove
    them (SIGKILL, the OOM killer): those of this user whose process is gone, including one
    whose pid now belongs to a process started later. They hold copies of the TLS keys, and in
    a pod the temporary directory outlives a container's restarts. Return the directories
    removed."""
    root = Path(tempfile.gettempdir()) if root is None else root
    removed = []
    for path in sorted(root.glob(f"{DIR_PREFIX}*-*")):
        tag = path.name[len(DIR_PREFIX) :].split("-", 1)[0]
        pid, dot, ticks = tag.partition(".")
        try:
            mine = path.lstat().st_uid == os.getuid()
        except OSError:
            continue
        named = pid.isdigit() and dot == "." and ticks.isdigit()
        if not (named and mine and path.is_dir() and not path.is_symlink()):
            continue
        if process_tag(int(pid)) == tag:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the front dies, so the proxy is never
    orphaned."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class FrontMetrics:
    """The front's own metrics: calls by outcome and the limit it admits by."""

    def __init__(self, registry: CollectorRegistry, config: FrontConfig) -> None:
        self.calls = Counter(
            "slimrank_front_calls_total",
            "Recommender calls through the front, by outcome: forwarded to the server and "
            "answered, refused by the front's limit (RESOURCE_EXHAUSTED), queue_timeout "
            "(refused by the queue front after waiting its queue timeout, "
            "RESOURCE_EXHAUSTED too), server_refused (forwarded, and refused by the server's own "
            "admission), upstream_error (the server could not be reached; the caller saw "
            "UNAVAILABLE), or other (the proxy answered with another HTTP status, e.g. 413 "
            "for a request over the size limit, or the caller went away)",
            ["outcome"],
            registry=registry,
        )
        for name in OUTCOMES:
            self.calls.labels(name)
        if config.rate is not None:
            Gauge(
                "slimrank_front_rate_limit",
                "Recommender calls a second the front admits (its --rate)",
                registry=registry,
            ).set(config.rate)
        if config.in_flight is not None:
            Gauge(
                "slimrank_front_in_flight_limit",
                "Recommender calls the front lets be at the server at once (its --in-flight)",
                registry=registry,
            ).set(config.in_flight)
            Gauge(
                "slimrank_front_queue_limit",
                "Recommender calls that may wait in the front's queue (its --queue)",
                registry=registry,
            ).set(config.queue)


class CallLogReader:
    """Reads the proxy's syslog datagrams (one per Recommender call) on a loopback UDP port
    and counts each call's outcome (``outcome(line)``) into :class:`FrontMetrics` on a
    thread of its own."""

    def __init__(self, metrics: FrontMetrics, outcome: Callable[[str], str | None]) -> None:
        self._metrics = metrics
        self._outcome = outcome
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind(("127.0.0.1", 0))
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        except OSError as err:
            self._sock.close()
            raise FrontError(f"cannot open the proxy's call-log socket: {err}") from err
        self._sock.settimeout(0.2)  # so that close() is seen
        self.port = int(self._sock.getsockname()[1])
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="front-log", daemon=True)

    def start(self) -> None:
        """Start counting."""
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            name = self._outcome(data.decode(errors="replace").strip())
            if name is not None:
                self._metrics.calls.labels(name).inc()

    def close(self) -> None:
        """Stop counting and release the port."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self._sock.close()


class ProxyProcess:
    """nginx or HAProxy in the foreground, in a process group of its own (nginx's master and
    workers). ``pid_file``: where the proxy writes its pid once it has bound its port (nginx
    does; HAProxy in the foreground does not, and is ready when its port accepts)."""

    def __init__(self, engine: str, args: list[str], pid_file: Path | None) -> None:
        self.engine = engine
        self._pid_file = pid_file
        self.proc = subprocess.Popen(args, start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        """The master's pid (also the process group's id)."""
        return self.proc.pid

    def wait_ready(self, host: str, port: int, stop: StopRequest) -> None:
        """Return once the proxy has bound its port and accepts a connection; raise
        :class:`FrontError` if it exits or stalls first."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not stop.is_set():
            if self.proc.poll() is not None:
                raise FrontError(
                    f"{self.engine} exited with code {self.proc.returncode} while starting on "
                    f"{host}:{port} (its message is above)"
                )
            if self._pid_file is None or (
                self._pid_file.is_file() and self._pid_file.read_text().strip() == str(self.pid)
            ):
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((host.strip("[]"), port), timeout=0.2),
                ):
                    return
            stop.wait(0.02)
        if stop.is_set():
            raise FrontError(f"stopped while {self.engine} was starting")
        raise FrontError(
            f"{self.engine} did not listen on {host}:{port} within {START_TIMEOUT_S:g} s"
        )

    def stop(self, grace_s: float) -> None:
        """Stop gracefully (nginx's SIGQUIT, HAProxy's SIGUSR1: finish the calls in flight and
        close), for up to ``grace_s``; then SIGTERM, then SIGKILL the whole group."""
        graceful = GRACEFUL_STOP[self.engine]
        for signum, wait_s in ((graceful, grace_s), (signal.SIGTERM, KILL_AFTER_S)):
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signum)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=wait_s)
        self.kill_group()

    def kill_group(self) -> None:
        """SIGKILL every process left in the group (workers whose master died included)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=KILL_AFTER_S)


def _metrics_endpoint(config: FrontConfig, registry: CollectorRegistry) -> MetricsEndpoint | None:
    if config.metrics_port is None:
        return None
    return start_metrics_endpoint(config.metrics_host, config.metrics_port, registry)


def _proxy_args(config: FrontConfig, binary: str, prefix: Path, conf: Path) -> list[list[str]]:
    """The proxy's config check and its foreground run, as argument lists."""
    if config.engine == "nginx":
        args = [binary, "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
        return [[*args, "-t", "-q"], [*args, "-g", "daemon off;"]]
    return [[binary, "-c", "-q", "-f", str(conf)], [binary, "-db", "-q", "-f", str(conf)]]


def write_pems(config: FrontConfig, prefix: Path) -> None:
    """HAProxy's combined certificate-and-key files, readable by their owner only."""
    for name, parts in haproxy_conf.combined_pems(config).items():
        path = prefix / name
        path.touch(mode=0o600)
        # Bytes as they are: a file that is not PEM is HAProxy's config check to refuse.
        path.write_bytes(b"\n".join(Path(part).read_bytes().strip() for part in parts) + b"\n")


def run_front(
    config: FrontConfig,
    binary: str,
    ready: Callable[[int, int | None, int], None],
    grace_s: float = 10.0,
) -> int:
    """Run the front until SIGTERM/SIGINT (then the proxy finishes the calls in flight, for up
    to ``grace_s``, before it is killed) or until the proxy exits; return 0 after a requested
    stop, 1 when the proxy exited by itself.

    ``binary``: the proxy ``config.engine`` names (nginx or haproxy), a name or a path.
    ``ready(port, metrics_port, proxy_pid)`` is called once the proxy listens.
    """
    engine = config.engine
    conf_module = nginx_conf if engine == "nginx" else haproxy_conf
    binary = find_proxy(engine, binary)
    if config.upstream_cert and (config.tls is None or config.tls.client_ca is None):
        log.warning(
            "the front presents a client certificate to the server but asks its own callers "
            "for none (--tls-client-ca): anyone who reaches its port gets the server's "
            "mutual-TLS access"
        )
    registry = CollectorRegistry()
    metrics = FrontMetrics(registry, config)
    reader = None
    prefix = None
    endpoint = None
    proxy = None
    try:
        reader = CallLogReader(metrics, conf_module.outcome)  # binds its log socket
        for stale in remove_stale_dirs():
            log.info("removed %s, left by a front that was killed before it could", stale)
        prefix = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{process_tag(os.getpid())}-"))
        with stop_on((signal.SIGTERM, signal.SIGINT)) as stop:
            # nginx started by root runs its workers as an unprivileged user: they must reach
            # the directory of temporary files.
            prefix.chmod(0o755)
            (prefix / "tmp").mkdir()
            (prefix / "tmp").chmod(0o1777)
            endpoint = _metrics_endpoint(config, registry)
            with contextlib.ExitStack() as held:
                # Held (SO_REUSEPORT, not listening) until the proxy has bound it too, so that
                # port 0's pick is not taken meanwhile; both proxies listen with reuseport.
                port = held.enter_context(reserve_port(config.host, config.port))  # ListenError
                conf = prefix / ("nginx.conf" if engine == "nginx" else "haproxy.cfg")
                conf.write_text(conf_module.render(config, str(prefix), port, reader.port))
                if engine == "haproxy":
                    write_pems(config, prefix)
                check_args, run_args = _proxy_args(config, binary, prefix, conf)
                check = subprocess.run(check_args, capture_output=True, text=True, check=False)
                if check.returncode != 0:
                    raise FrontError(
                        f"{engine} refused the front's config:\n"
                        f"{(check.stderr or check.stdout).strip()}"
                    )
                pid_file = prefix / "nginx.pid" if engine == "nginx" else None
                proxy = ProxyProcess(engine, run_args, pid_file)
                reader.start()
                proxy.wait_ready(config.host, port, stop)
            ready(port, None if endpoint is None else endpoint.port, proxy.pid)
            while not stop.wait(0.5):
                if proxy.proc.poll() is not None:
                    log.error("%s exited by itself with code %d", engine, proxy.proc.returncode)
                    return 1
            log.info("stopping: %s finishes the calls in flight (up to %g s)", engine, grace_s)
            proxy.stop(grace_s)
            return 0
    finally:
        if proxy is not None:
            proxy.kill_group()
        if reader is not None:
            reader.close()
        if endpoint is not None:
            endpoint.close()
        if prefix is not None:
            shutil.rmtree(prefix, ignore_errors=True)
