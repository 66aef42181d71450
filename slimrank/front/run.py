"""Run the front: render nginx.conf into a private directory, check it with ``nginx -t``, run
nginx in the foreground, count its call log into Prometheus metrics, and stop it gracefully.

The thin I/O shell around :mod:`slimrank.front.nginx_conf`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
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
from slimrank.serving.metrics import start_metrics_endpoint

log = logging.getLogger(__name__)

OUTCOMES = ("forwarded", "refused", "server_refused", "upstream_error")
INSTALL_HINT = "install Debian's nginx-light (sudo scripts/install_nginx.sh) or pass --nginx PATH"
START_TIMEOUT_S = 10.0


class FrontError(SlimrankError):
    """The front could not start: nginx missing, its config refused, or its port taken."""


def find_nginx(nginx: str) -> str:
    """Return the path of the nginx binary ``nginx`` names (a path or a name on PATH, also
    looked up in /usr/sbin, where Debian puts it and a user's PATH often lacks)."""
    found = shutil.which(nginx) or shutil.which(nginx, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FrontError(f"nginx not found ({nginx!r}): {INSTALL_HINT}")
    return found


def free_port(host: str) -> int:
    """Return a port that is free on ``host`` now (nginx cannot be told to pick one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host.strip("[]"), 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the front dies, so nginx is never orphaned."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class CallLog:
    """Counts the front's Recommender calls by outcome from nginx's syslog datagrams."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "slimrank_front_calls_total",
            "Recommender calls through the front, by outcome: forwarded to the server and "
            "answered, refused by the front's rate limit (RESOURCE_EXHAUSTED), "
            "server_refused (forwarded, and refused by the server's own admission), or "
            "upstream_error (the server could not be reached; the caller saw UNAVAILABLE)",
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
        self._counts = dict.fromkeys(OUTCOMES, 0)
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.port = int(self.sock.getsockname()[1])
        self._thread = threading.Thread(target=self._read, name="front-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            name = outcome(data.decode(errors="replace").strip())
            if name is not None:
                self.calls.labels(name).inc()
                with self._lock:
                    self._counts[name] += 1

    def counts(self) -> dict[str, int]:
        """The calls counted so far, by outcome."""
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        self.sock.close()


def _wait_listening(proc: subprocess.Popen[bytes], host: str, port: int) -> None:
    """Return once nginx accepts connections on ``host:port``; raise if it exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FrontError(
                f"nginx exited with code {proc.returncode} while starting on {host}:{port} "
                "(its message is above; a port in use is the usual cause)"
            )
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise FrontError(f"nginx did not listen on {host}:{port} within {START_TIMEOUT_S:g} s")


def run_front(
    config: FrontConfig,
    nginx: str,
    ready: Callable[[int, int | None, int], None],
    grace_s: float = 10.0,
) -> int:
    """Run the front until SIGTERM/SIGINT (then nginx finishes the calls in flight, for up to
    ``grace_s``) or until nginx exits; return 0 after a requested stop, 1 otherwise.

    ``ready(port, metrics_port, nginx_pid)`` is called once nginx listens.
    """
    binary = find_nginx(nginx)
    prefix = Path(tempfile.mkdtemp(prefix="slimrank-front-"))
    registry = CollectorRegistry()
    calls = CallLog(registry)
    try:
        # nginx started by root runs its workers as an unprivileged user: they must reach the
        # directory for temporary files.
        prefix.chmod(0o755)
        (prefix / "tmp").mkdir(mode=0o1777)
        (prefix / "tmp").chmod(0o1777)
        port = config.port or free_port(config.host)
        conf = prefix / "nginx.conf"
        conf.write_text(render(config, str(prefix), port, calls.port))
        calls.rate.set(config.rate)
        args = [binary, "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
        check = subprocess.run([*args, "-t", "-q"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise FrontError(f"nginx refused the front's config:\n{check.stderr.strip()}")
        calls.start()
        proc = subprocess.Popen(args, preexec_fn=_die_with_parent)
        stopping = threading.Event()

        def stop(signum: int, frame: object) -> None:
            stopping.set()
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)  # graceful: in-flight calls finish

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            _wait_listening(proc, config.host, port)
            endpoint = None
            if config.metrics_port is not None:
                endpoint = start_metrics_endpoint(
                    config.metrics_host, config.metrics_port, registry
                )
            ready(port, None if endpoint is None else endpoint.port, proc.pid)
            while proc.poll() is None:
                try:
                    proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                except KeyboardInterrupt:
                    stop(signal.SIGINT, None)
            if not stopping.is_set():
                log.error("nginx exited by itself with code %d", proc.returncode)
                return 1
            return 0
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        calls.close()
        shutil.rmtree(prefix, ignore_errors=True)
