"""Run the front: render nginx.conf into a private directory, check it with ``nginx -t``, run
nginx in the foreground in its own process group, count its call log into Prometheus metrics,
and stop it gracefully (then by force, after ``grace_s``).

The thin I/O shell around :mod:`slimrank.front.nginx_conf`.
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
from slimrank.front.config import FrontConfig
from slimrank.front.nginx_conf import outcome, render
from slimrank.serving.metrics import MetricsEndpoint, start_metrics_endpoint
from slimrank.serving.stop_request import StopRequest, stop_on
from slimrank.serving.workers import reserve_port

log = logging.getLogger(__name__)

OUTCOMES = ("forwarded", "refused", "server_refused", "upstream_error", "other")
INSTALL_HINT = "install Debian's nginx-light (sudo scripts/install_nginx.sh) or pass --nginx PATH"
START_TIMEOUT_S = 10.0
KILL_AFTER_S = 5.0  # after the grace and a SIGTERM, SIGKILL the process group
PR_SET_PDEATHSIG = 1
# Resolved here, in the parent: after fork the child only calls it (no dlopen there).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


class FrontError(SlimrankError):
    """The front could not start: nginx missing, its config refused, or a port taken."""


def find_nginx(nginx: str) -> str:
    """Return the path of the nginx binary ``nginx`` names (a path or a name on PATH, also
    looked up in /usr/sbin, where Debian puts it and a user's PATH often lacks)."""
    found = shutil.which(nginx) or shutil.which(nginx, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FrontError(f"nginx not found ({nginx!r}): {INSTALL_HINT}")
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the front dies, so nginx is never orphaned."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class FrontMetrics:
    """The front's own metrics: calls by outcome and the rate it admits."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "slimrank_front_calls_total",
            "Recommender calls through the front, by outcome: forwarded to the server and "
            "answered, refused by the front's rate limit (RESOURCE_EXHAUSTED), "
            "server_refused (forwarded, and refused by the server's own admission), "
            "upstream_error (the server could not be reached; the caller saw UNAVAILABLE), "
            "or other (nginx answered with another HTTP status, e.g. 413 for a request over "
            "the size limit, or the caller went away)",
            ["outcome"],
            registry=registry,
        )
        self.rate = Gauge(
            "slimrank_front_rate_limit",
            "Recommender calls a second the front admits (its --rate)",
            registry=registry,
        )
        for name in OUTCOMES:
            self.calls.labels(name)


class CallLogReader:
    """Reads nginx's syslog datagrams (one per Recommender call) on a loopback UDP port and
    counts each call's outcome into :class:`FrontMetrics` on a thread of its own."""

    def __init__(self, metrics: FrontMetrics) -> None:
        self._metrics = metrics
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
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
            name = outcome(data.decode(errors="replace").strip())
            if name is not None:
                self._metrics.calls.labels(name).inc()

    def close(self) -> None:
        """Stop counting and release the port."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self._sock.close()


class NginxProcess:
    """nginx in the foreground, in a process group of its own (master and workers)."""

    def __init__(self, args: list[str], pid_file: Path) -> None:
        self._pid_file = pid_file
        self.proc = subprocess.Popen(args, start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        """The master's pid (also the process group's id)."""
        return self.proc.pid

    def wait_ready(self, host: str, port: int, stop: StopRequest) -> None:
        """Return once nginx has bound its port (it writes its pid file after binding) and
        accepts a connection; raise :class:`FrontError` if it exits or stalls first."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not stop.is_set():
            if self.proc.poll() is not None:
                raise FrontError(
                    f"nginx exited with code {self.proc.returncode} while starting on "
                    f"{host}:{port} (its message is above)"
                )
            if self._pid_file.is_file() and self._pid_file.read_text().strip() == str(self.pid):
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((host.strip("[]"), port), timeout=0.2),
                ):
                    return
            stop.wait(0.02)
        if stop.is_set():
            raise FrontError("stopped while nginx was starting")
        raise FrontError(f"nginx did not listen on {host}:{port} within {START_TIMEOUT_S:g} s")

    def stop(self, grace_s: float) -> None:
        """Stop gracefully (SIGQUIT: nginx finishes the calls in flight and closes), for up to
        ``grace_s``; then SIGTERM, then SIGKILL the whole group."""
        for signum, wait_s in ((signal.SIGQUIT, grace_s), (signal.SIGTERM, KILL_AFTER_S)):
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
    try:
        return start_metrics_endpoint(config.metrics_host, config.metrics_port, registry)
    except OSError as err:
        raise FrontError(
            f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {err}"
        ) from err


def run_front(
    config: FrontConfig,
    nginx: str,
    ready: Callable[[int, int | None, int], None],
    grace_s: float = 10.0,
) -> int:
    """Run the front until SIGTERM/SIGINT (then nginx finishes the calls in flight, for up to
    ``grace_s``, before it is killed) or until nginx exits; return 0 after a requested stop,
    1 when nginx exited by itself.

    ``ready(port, metrics_port, nginx_pid)`` is called once nginx listens.
    """
    binary = find_nginx(nginx)
    if config.upstream_cert and (config.tls is None or config.tls.client_ca is None):
        log.warning(
            "the front presents a client certificate to the server but asks its own callers "
            "for none (--tls-client-ca): anyone who reaches its port gets the server's "
            "mutual-TLS access"
        )
    prefix = Path(tempfile.mkdtemp(prefix="slimrank-front-"))
    registry = CollectorRegistry()
    metrics = FrontMetrics(registry)
    reader = CallLogReader(metrics)
    endpoint = None
    nginx_process = None
    try:
        with stop_on((signal.SIGTERM, signal.SIGINT)) as stop:
            # nginx started by root runs its workers as an unprivileged user: they must reach
            # the directory of temporary files.
            prefix.chmod(0o755)
            (prefix / "tmp").mkdir()
            (prefix / "tmp").chmod(0o1777)
            endpoint = _metrics_endpoint(config, registry)
            with contextlib.ExitStack() as held:
                # Held (SO_REUSEPORT, not listening) until nginx has bound it too, so that
                # port 0's pick is not taken meanwhile; nginx listens with reuseport.
                try:
                    port = held.enter_context(reserve_port(config.host, config.port))
                except OSError as err:
                    raise FrontError(
                        f"cannot listen on {config.host}:{config.port}: {err}"
                    ) from err
                conf = prefix / "nginx.conf"
                conf.write_text(render(config, str(prefix), port, reader.port))
                metrics.rate.set(config.rate)
                args = [binary, "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
                check = subprocess.run(
                    [*args, "-t", "-q"], capture_output=True, text=True, check=False
                )
                if check.returncode != 0:
                    raise FrontError(f"nginx refused the front's config:\n{check.stderr.strip()}")
                nginx_process = NginxProcess([*args, "-g", "daemon off;"], prefix / "nginx.pid")
                reader.start()
                nginx_process.wait_ready(config.host, port, stop)
            ready(port, None if endpoint is None else endpoint.port, nginx_process.pid)
            while not stop.wait(0.5):
                if nginx_process.proc.poll() is not None:
                    log.error("nginx exited by itself with code %d", nginx_process.proc.returncode)
                    return 1
            log.info("stopping: nginx finishes the calls in flight (up to %g s)", grace_s)
            nginx_process.stop(grace_s)
            return 0
    finally:
        if nginx_process is not None:
            nginx_process.kill_group()
        reader.close()
        if endpoint is not None:
            endpoint.close()
        shutil.rmtree(prefix, ignore_errors=True)
