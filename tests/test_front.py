"""``slimrank front``: the real nginx in front of a real ``slimrank serve``, called through a
real client. The front forwards calls unchanged, refuses Recommender calls past its rate with
the server's RESOURCE_EXHAUSTED and retry details (and those never reach the server), never
limits health or Admin calls, counts every outcome, and stops without leaving nginx behind.

nginx comes from Debian's package (``scripts/install_nginx.sh``): installed here when we are
root, a failure in CI when missing, a skip otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from serve_process import Server, scrape, start_ready

from slimrank.bundle import publish
from slimrank.front.cli import PRINTED_PREFIX
from slimrank.front.config import FrontConfig, nginx_rate
from slimrank.front.nginx_conf import REFUSAL_MESSAGE, outcome, refusal_headers, render
from slimrank.front.run import OUTCOMES
from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.loader import random_flat_bundle
from slimrank.serving.security import channel_credentials
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import ModelSnapshot, SnapshotHolder, random_snapshot
from slimrank.serving.status import field_violations, retry_delay_s

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"front on (\S+):(\d+) metrics (\S+) pid (\d+)")
RECOMMEND = "/slimrank.v1.Recommender/Recommend"
FRONT = [sys.executable, "-m", "slimrank.cli", "front"]


def nginx_binary() -> str:
    """Return nginx's path, installing Debian's package first if we can."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found:
        return found
    if os.geteuid() == 0:
        subprocess.run([str(ROOT / "scripts" / "install_nginx.sh")], check=True, timeout=900)
        found = shutil.which("nginx", path="/usr/sbin:/usr/bin")
        if found is None:
            pytest.fail("nginx still missing after scripts/install_nginx.sh")
        return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("nginx is missing in CI: run `sudo scripts/install_nginx.sh` first")
    pytest.skip("nginx is not installed and we are not root: `sudo scripts/install_nginx.sh`")


@pytest.fixture(scope="module")
def nginx() -> str:
    return nginx_binary()


def outcomes(**counts: float) -> dict[str, float]:
    """``slimrank_front_calls_total`` by outcome: these counts, every other outcome 0."""
    return {name: counts.get(name, 0) for name in OUTCOMES}


def front_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FRONT, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


class Front:
    """A ``slimrank front`` subprocess and what its ready line announced."""

    def __init__(self, nginx: str, upstream: str, *args: str) -> None:
        ports = ["--port", "0", "--metrics-port", "0"]
        argv = ["front", "--nginx", nginx, *ports, "--upstream", upstream, *args]
        self.proc, match = start_ready(argv, READY)
        self.target = f"{match[1]}:{match[2]}"
        self.metrics = match[3]
        self.nginx_pid = int(match[4])
        # nginx retitles itself ("nginx: master process /usr/sbin/nginx -p DIR ...").
        title = Path(f"/proc/{self.nginx_pid}/cmdline").read_bytes().replace(b"\0", b" ")
        self.prefix = Path(re.search(r" -p (\S+)", title.decode())[1])  # its own directory

    def calls(self) -> dict[str, float]:
        """``slimrank_front_calls_total`` by outcome."""
        return {
            s.labels["outcome"]: s.value
            for s in scrape(self.metrics)
            if s.name == "slimrank_front_calls_total"
        }

    def gauge(self, name: str) -> float:
        (value,) = [s.value for s in scrape(self.metrics) if s.name == name]
        return value

    def calls_when(self, expected: dict[str, float], timeout_s: float = 10) -> dict[str, float]:
        """The counts once they equal ``expected`` and still do 0.3 s later (the log is read
        asynchronously, so a late count would show then), or the last counts read after
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self.calls()
            if seen == expected:
                time.sleep(0.3)
                return self.calls()
            if time.monotonic() > deadline:
                return seen
            time.sleep(0.05)

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(signum)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stop()


def slow_snapshot(seconds: float) -> ModelSnapshot:
    """A random snapshot whose ranker sleeps ``seconds`` a call."""
    base = random_snapshot("v1", dim=8)

    def score(features: np.ndarray) -> np.ndarray:
        time.sleep(seconds)
        return base.score(features)

    return dataclasses.replace(base, score=score)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("front") / "bundles"
    publish(root, random_flat_bundle("a", seed=3))
    server = Server(["--bundles", str(root), "--metrics-port", "0", "--admin-insecure"])
    yield server
    server.terminate()


# --- configuration ---------------------------------------------------------------------------


def test_rates_are_written_as_nginx_reads_them() -> None:
    assert nginx_rate(400) == "400r/s"
    assert nginx_rate(400.0) == "400r/s"
    assert nginx_rate(0.5) == "30r/m"
    assert nginx_rate(2.5) == "150r/m"
    assert nginx_rate(1 / 60) == "1r/m"
    for bad in (0, -5, 0.3333, 1 / 120, float("nan"), float("inf")):
        assert nginx_rate(bad) is None, bad


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--rate", "0"], "--rate"),
        (["--rate", "0.3333"], "--rate"),
        (["--rate", "nan"], "--rate"),
        (["--rate", "10", "--burst", "-1"], "--burst"),
        (["--rate", "10", "--upstream", "nohost"], "--upstream"),
        (["--rate", "10", "--upstream", "h:0"], "--upstream"),
        (["--rate", "10", "--port", "70000"], "--port"),
        (["--rate", "10", "--host", "a b"], "--host"),
        (["--rate", "10", "--retry-after-ms", "-1"], "--retry-after-ms"),
        (["--rate", "10", "--nginx-workers", "0"], "--nginx-workers"),
        (["--rate", "10", "--max-message-bytes", "10"], "--max-message-bytes"),
        (["--rate", "10", "--port", "0", "--print-config"], "--port"),
    ],
)
def test_a_bad_flag_is_refused_by_name(args: list[str], named: str) -> None:
    result = front_cli(*args)
    assert result.returncode == 2, result.stderr
    assert f"error: {named}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_nginx_is_named_with_how_to_install_it(tmp_path: Path) -> None:
    result = front_cli("--rate", "10", "--nginx", str(tmp_path / "no-nginx"))
    assert result.returncode == 2, result.stderr
    assert "nginx not found" in result.stderr and "install_nginx.sh" in result.stderr


def test_the_refusal_carries_the_servers_retry_details() -> None:
    headers = dict(refusal_headers(FrontConfig(rate=10, retry_after_s=0.12)))
    assert headers["grpc-status"] == "8"
    assert headers["grpc-message"] == REFUSAL_MESSAGE
    assert headers["grpc-retry-pushback-ms"] == "120"
    # Nothing nginx would read as a variable or the end of a quoted string.
    for value in headers.values():
        assert '"' not in value and "$" not in value and "%" not in value


def test_log_lines_are_read_as_outcomes() -> None:
    assert outcome("<190>slimrank_front: REJECTED 200 - -") == "refused"
    assert outcome("<190>slimrank_front: PASSED 200 - 0") == "forwarded"
    assert outcome("<190>slimrank_front: DELAYED 200 - 0") == "forwarded"
    # The server's own answers: INVALID_ARGUMENT is an answer, RESOURCE_EXHAUSTED a refusal,
    # whether it came in the headers (trailers-only) or the trailers.
    assert outcome("<190>slimrank_front: PASSED 200 3 -") == "forwarded"
    assert outcome("<190>slimrank_front: PASSED 200 8 -") == "server_refused"
    assert outcome("<190>slimrank_front: PASSED 200 - 8") == "server_refused"
    assert outcome("<190>slimrank_front: PASSED 502 - -") == "upstream_error"
    assert outcome("<190>slimrank_front: PASSED 504 - -") == "upstream_error"
    assert outcome("garbage") is None
    assert outcome("<190>slimrank_front: PASSED 200") is None


def nginx_check(nginx: str, prefix: Path, text: str) -> subprocess.CompletedProcess:
    """``nginx -t`` on ``text`` written as ``prefix/nginx.conf``, with ``prefix/tmp``."""
    (prefix / "tmp").mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return subprocess.run(
        [nginx, "-t", "-p", str(prefix), "-c", str(conf), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_nginx_accepts_the_rendered_config(nginx: str, tmp_path: Path) -> None:
    config = FrontConfig(rate=0.5, burst=0, upstream="127.0.0.1:9", worker_processes=2)
    text = render(config, str(tmp_path), 50050, 5140)
    result = nginx_check(nginx, tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert "rate=30r/m" in text and "zone=slimrank_calls;" in text
    text = render(FrontConfig(rate=400, burst=25), str(tmp_path), 50050, 5140)
    result = nginx_check(nginx, tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert "rate=400r/s" in text and "burst=25 nodelay" in text


def test_the_printed_config_is_one_nginx_accepts(nginx: str, tmp_path: Path) -> None:
    result = front_cli("--rate", "400", "--burst", "50", "--port", "50050", "--print-config")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "daemon" not in text  # a system nginx (systemd's unit) sets it on its command line
    assert "rate=400r/s" in text and "burst=50 nodelay" in text
    # Its paths, moved to a scratch directory, as a system nginx would have them.
    check = nginx_check(nginx, tmp_path, text.replace(PRINTED_PREFIX, str(tmp_path)))
    assert check.returncode == 0, check.stderr


# --- through the real server -----------------------------------------------------------------


def test_forwarded_calls_are_answered_as_the_server_answers_them(nginx: str, server) -> None:
    front = Front(nginx, server.target, "--rate", "1000", "--burst", "100")
    try:
        with (
            SlimrankClient(front.target, timeout=10, retries=0) as via,
            SlimrankClient(server.target, timeout=10, retries=0) as direct,
        ):
            for user in ("u0", "u7", "u39"):
                assert via.recommend(user, 10) == direct.recommend(user, 10)
            recent = via.recommend("nobody", 5, recent=["a1", "a2"])
            assert recent == direct.recommend("nobody", 5, recent=["a1", "a2"])
            # The server's own errors pass through whole: code, message and details.
            with pytest.raises(grpc.RpcError) as err:
                via.recommend("u0", 0)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "k" in field_violations(err.value)
        expected = outcomes(forwarded=5)
        assert front.calls_when(expected) == expected
        assert front.gauge("slimrank_front_rate_limit") == 1000
    finally:
        front.close()


def test_calls_past_the_rate_are_refused_by_the_front_and_never_reach_the_server(
    nginx: str, server
) -> None:
    # One call a minute and a burst of 3: of 12 calls at once, exactly 4 go through.
    front = Front(nginx, server.target, "--rate", "0.016666666666666666", "--burst", "3")
    before = server.metric("slimrank_grpc_requests_total", {"method": RECOMMEND})
    try:
        with SlimrankClient(front.target, timeout=10, retries=0) as client:
            start = threading.Barrier(12)

            def call(i: int) -> grpc.RpcError | None:
                start.wait()
                try:
                    client.recommend(f"u{i}", 5)
                except grpc.RpcError as err:
                    return err
                return None

            with ThreadPoolExecutor(12) as pool:
                results = list(pool.map(call, range(12)))
        refused = [r for r in results if r is not None]
        assert len(refused) == 8, [r.code() for r in refused]
        for err in refused:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.details() == REFUSAL_MESSAGE
            assert retry_delay_s(err) == pytest.approx(0.05)
            assert ("grpc-retry-pushback-ms", "50") in [
                (m.key, m.value) for m in err.trailing_metadata()
            ]
        after = server.metric("slimrank_grpc_requests_total", {"method": RECOMMEND})
        assert after - before == 4
        expected = outcomes(forwarded=4, refused=8)
        assert front.calls_when(expected) == expected
    finally:
        front.close()


def test_health_and_admin_calls_are_never_limited(nginx: str, server) -> None:
    front = Front(nginx, server.target, "--rate", "0.016666666666666666", "--burst", "0")
    try:
        with SlimrankClient(front.target, timeout=10, retries=0) as client:
            client.recommend("u1", 3)  # the bucket is now full for a minute
            with pytest.raises(grpc.RpcError) as err:
                client.recommend("u1", 3)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for _ in range(20):
                assert client.health() == "SERVING"
                assert client.health("slimrank.v1.Recommender") == "SERVING"
                assert client.model_info().n_items == 300
    finally:
        front.close()


def test_an_unreachable_server_is_unavailable_and_counted(nginx: str) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    front = Front(nginx, dead, "--rate", "100")
    try:
        with (
            SlimrankClient(front.target, timeout=10, retries=0) as client,
            pytest.raises(grpc.RpcError) as err,
        ):
            client.recommend("u1", 3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        expected = outcomes(upstream_error=1)
        assert front.calls_when(expected) == expected
    finally:
        front.close()


def group_gone(pgid: int, timeout_s: float = 10) -> bool:
    """Whether every process of the group (nginx's master and workers) is gone (zombies of
    the test's own children aside) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        members = [
            p
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _pgid_of(p) == pgid and _state_of(p) != "Z"
        ]
        if not members:
            return True
        time.sleep(0.05)
    return False


def _stat_fields(proc_dir: Path) -> list[str]:
    try:
        return proc_dir.joinpath("stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _pgid_of(proc_dir: Path) -> int | None:
    fields = _stat_fields(proc_dir)
    return int(fields[2]) if len(fields) > 2 else None


def _state_of(proc_dir: Path) -> str:
    fields = _stat_fields(proc_dir)
    return fields[0] if fields else ""


def test_a_stop_ends_nginx_and_removes_its_directory(nginx: str, server) -> None:
    front = Front(nginx, server.target, "--rate", "100")
    assert front.prefix.is_dir()
    with SlimrankClient(front.target, timeout=10, retries=0) as client:
        client.recommend("u2", 3)
    code, err = front.stop(signal.SIGTERM)
    assert code == 0, err
    assert group_gone(front.nginx_pid), "nginx (master or workers) outlived its front"
    assert not front.prefix.exists()


def test_a_stop_waits_for_calls_in_flight_for_the_grace_only(nginx: str) -> None:
    # A server that accepts connections and never answers: the call stays in flight.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        upstream = f"127.0.0.1:{silent.getsockname()[1]}"
        front = Front(nginx, upstream, "--rate", "100", "--grace", "1")
        errors: list[grpc.RpcError] = []

        def call() -> None:
            with SlimrankClient(front.target, timeout=60, retries=0) as client:
                try:
                    client.recommend("u1", 3)
                except grpc.RpcError as err:
                    errors.append(err)

        caller = threading.Thread(target=call)
        caller.start()
        conn, _ = silent.accept()  # nginx forwarded the call
        started = time.monotonic()
        code, err = front.stop(signal.SIGTERM)
        took = time.monotonic() - started
        caller.join(30)
        conn.close()
    assert code == 0, err
    # The grace (1 s), then SIGTERM and at most its 5 s wait: not the call's 60 s deadline.
    assert 0.9 < took < 10, took
    assert errors and errors[0].code() != grpc.StatusCode.OK
    assert group_gone(front.nginx_pid)


def test_a_killed_front_takes_its_nginx_with_it(nginx: str, server) -> None:
    front = Front(nginx, server.target, "--rate", "100")
    front.stop(signal.SIGKILL)
    assert group_gone(front.nginx_pid), "nginx outlived its front"
    shutil.rmtree(front.prefix, ignore_errors=True)  # a killed front cannot remove it


def test_a_front_whose_nginx_dies_exits_and_leaves_no_worker(nginx: str, server) -> None:
    front = Front(nginx, server.target, "--rate", "100")
    host, port = front.target.rsplit(":", 1)
    os.kill(front.nginx_pid, signal.SIGKILL)  # the master only: its workers live on, orphans
    code = front.proc.wait(timeout=30)
    assert code == 1
    # Checked first: an orphaned worker would also hold the front's stderr open.
    assert group_gone(front.nginx_pid), "nginx's workers outlived their master and front"
    assert "nginx exited by itself" in (front.proc.stderr.read() if front.proc.stderr else "")
    with pytest.raises(OSError):  # nobody serves the port any more
        socket.create_connection((host, int(port)), timeout=2).close()
    assert not front.prefix.exists()


def test_a_port_in_use_is_a_clear_error(nginx: str, server) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = front_cli(
            "--nginx", nginx, "--rate", "10", "--upstream", server.target, "--port", str(port)
        )
    assert result.returncode == 2, result.stderr
    assert "front on" not in result.stdout
    assert f"slimrank: error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_metrics_port_in_use_is_a_clear_error(nginx: str, server) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = front_cli(
            *("--nginx", nginx, "--rate", "10", "--upstream", server.target, "--port", "0"),
            *("--metrics-port", str(port)),
        )
    assert result.returncode == 2, result.stderr
    assert f"slimrank: error: cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_calls_the_server_refuses_are_counted_as_its_refusals(nginx: str) -> None:
    # A real server (in this process) that takes one call of 50 ms at a time and refuses
    # the rest itself; the front lets every call through.
    server, port = create_server(
        ServerConfig(port=0, max_inflight=1),
        SnapshotHolder(slow_snapshot(0.05)),
        CollectorRegistry(),
    )
    server.mark_serving()
    front = Front(nginx, f"127.0.0.1:{port}", "--rate", "1000", "--burst", "100")
    try:
        with SlimrankClient(front.target, timeout=10, retries=0) as client:
            start = threading.Barrier(8)

            def call(i: int) -> str | None:
                start.wait()
                try:
                    client.recommend(f"u{i}", 3)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                    return err.details()
                return None

            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(call, range(8)))
        refused = [r for r in results if r is not None]
        assert refused and REFUSAL_MESSAGE not in refused  # the server's, not the front's
        expected = outcomes(forwarded=8 - len(refused), server_refused=len(refused))
        assert front.calls_when(expected) == expected
    finally:
        front.close()
        server.shutdown(0).wait(10)


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA with a server cert (localhost, 127.0.0.1) and a client cert."""
    out = tmp_path_factory.mktemp("certs")
    script = ROOT / "scripts" / "gen_certs.sh"
    subprocess.run(["bash", str(script), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def tls_server(certs: Path, tmp_path_factory: pytest.TempPathFactory):
    """``slimrank serve`` over mutual TLS, as deploy/ runs it."""
    root = tmp_path_factory.mktemp("front-tls") / "bundles"
    publish(root, random_flat_bundle("a", seed=4))
    tls = ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
    server = Server(
        [
            "--bundles",
            str(root),
            "--metrics-port",
            "0",
            *tls,
            "--tls-client-ca",
            str(certs / "ca.pem"),
        ]
    )
    yield server
    server.terminate()


def mutual_tls(certs: Path) -> grpc.ChannelCredentials:
    return channel_credentials(certs / "ca.pem", certs / "client.pem", certs / "client.key")


def test_mutual_tls_on_both_sides(nginx: str, certs: Path, tls_server) -> None:
    front = Front(
        nginx,
        tls_server.target,
        *("--rate", "1000"),
        *("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")),
        *("--tls-client-ca", str(certs / "ca.pem")),
        *("--upstream-tls-ca", str(certs / "ca.pem"), "--upstream-tls-name", "localhost"),
        *("--upstream-tls-cert", str(certs / "client.pem")),
        *("--upstream-tls-key", str(certs / "client.key")),
    )
    try:
        with (
            SlimrankClient(front.target, timeout=10, retries=0, tls=mutual_tls(certs)) as via,
            SlimrankClient(tls_server.target, timeout=10, retries=0, tls=mutual_tls(certs)) as to,
        ):
            assert via.recommend("u3", 10) == to.recommend("u3", 10)
        # Neither a plaintext client nor a TLS client without a certificate gets through.
        with (
            SlimrankClient(front.target, timeout=5, retries=0) as plain,
            pytest.raises(grpc.RpcError) as err,
        ):
            plain.recommend("u3", 10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        anonymous = channel_credentials(certs / "ca.pem")
        with (
            SlimrankClient(front.target, timeout=5, retries=0, tls=anonymous) as anon,
            pytest.raises(grpc.RpcError) as err,
        ):
            anon.recommend("u3", 10)
        # nginx asks for the certificate in the handshake and answers HTTP 400 without one.
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "400" in (err.value.details() or "")
        expected = outcomes(forwarded=1)
        assert front.calls_when(expected) == expected
    finally:
        front.close()


@pytest.mark.parametrize(
    "upstream_flags",
    [
        [],  # plaintext to a TLS server
        # The server's certificate does not carry that name (all else right).
        [
            *("--upstream-tls-ca", "ca.pem", "--upstream-tls-name", "not-the-server.example"),
            *("--upstream-tls-cert", "client.pem", "--upstream-tls-key", "client.key"),
        ],
        ["--upstream-tls-ca", "ca.pem", "--upstream-tls-name", "localhost"],  # no client cert
    ],
)
def test_a_server_the_front_cannot_reach_safely_is_unavailable(
    nginx: str, certs: Path, tls_server, upstream_flags: list[str]
) -> None:
    flags = [str(certs / f) if f.endswith((".pem", ".key")) else f for f in upstream_flags]
    front = Front(nginx, tls_server.target, "--rate", "1000", *flags)
    try:
        with (
            SlimrankClient(front.target, timeout=10, retries=0) as client,
            pytest.raises(grpc.RpcError) as err,
        ):
            client.recommend("u3", 10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        front.close()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--tls-cert", "ca.pem"], "--tls-cert"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca"),
        (
            ["--upstream-tls-cert", "client.pem", "--upstream-tls-key", "client.key"],
            "--upstream-tls-cert",
        ),
        (
            ["--upstream-tls-ca", "ca.pem", "--upstream-tls-cert", "client.pem"],
            "--upstream-tls-cert",
        ),
        (["--upstream-tls-name", "localhost"], "--upstream-tls-name"),
        (["--upstream-tls-ca", "missing.pem"], "--upstream-tls-ca"),
    ],
)
def test_bad_tls_flags_are_refused_by_name(certs: Path, args: list[str], named: str) -> None:
    result = front_cli(
        "--rate", "10", *[str(certs / a) if "." in a and a != "localhost" else a for a in args]
    )
    assert result.returncode == 2, result.stderr
    assert f"error: {named}" in result.stderr, result.stderr
