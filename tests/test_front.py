"""``slimrank front``: the real nginx (``--rate``) or HAProxy (``--in-flight``) in front of a
real ``slimrank serve``, called through a real client. The front forwards calls unchanged,
refuses Recommender calls past its limit with the server's RESOURCE_EXHAUSTED and retry
details (and those never reach the server), never limits health or Admin calls, counts every
outcome, and stops without leaving its proxy behind. What both proxies must do is tested
on both (the ``proxy`` fixture); each limit's own behaviour on its own proxy.

The proxies come from Debian's packages (``scripts/install_nginx.sh``,
``scripts/install_haproxy.sh``): installed here when we are root, a failure in CI when
missing, a skip otherwise.
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
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry
from serve_process import Server, scrape, start_ready

from slimrank.bundle import publish
from slimrank.front import haproxy_conf
from slimrank.front.cli import PRINTED_PREFIX
from slimrank.front.config import FrontConfig, nginx_rate
from slimrank.front.nginx_conf import REFUSAL_MESSAGE, outcome, render
from slimrank.front.refusal import (
    QUEUE_MESSAGE,
    RATE_MESSAGE,
    refusal_headers,
    too_large_message,
)
from slimrank.front.run import OUTCOMES, process_tag, remove_stale_dirs, write_pems
from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.loader import random_flat_bundle
from slimrank.serving.proto.slimrank.v1 import recommender_pb2, recommender_pb2_grpc
from slimrank.serving.security import TLSConfig, channel_credentials
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import ModelSnapshot, SnapshotHolder, random_snapshot
from slimrank.serving.status import field_violations, retry_delay_s

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"front on (\S+):(\d+) metrics (\S+) pid (\d+)")
RECOMMEND = "/slimrank.v1.Recommender/Recommend"
FRONT = [sys.executable, "-m", "slimrank.cli", "front"]


def proxy_binary(engine: str) -> str:
    """Return the path of ``engine`` (nginx or haproxy), installing Debian's package first if
    we can."""
    found = shutil.which(engine) or shutil.which(engine, path="/usr/sbin")
    if found:
        return found
    script = f"scripts/install_{engine}.sh"
    if os.geteuid() == 0:
        subprocess.run([str(ROOT / script)], check=True, timeout=900)
        found = shutil.which(engine, path="/usr/sbin:/usr/bin")
        if found is None:
            pytest.fail(f"{engine} still missing after {script}")
        return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{engine} is missing in CI: run `sudo {script}` first")
    pytest.skip(f"{engine} is not installed and we are not root: `sudo {script}`")


@dataclasses.dataclass(frozen=True)
class Proxy:
    """One of the front's proxies: its binary, and a limit no test call reaches."""

    engine: str
    binary: str

    @property
    def open_limit(self) -> tuple[str, ...]:
        if self.engine == "nginx":
            return ("--rate", "1000", "--burst", "100")
        return ("--in-flight", "64", "--queue", "48")


@pytest.fixture(scope="module")
def nginx() -> str:
    return proxy_binary("nginx")


@pytest.fixture(scope="module")
def haproxy() -> str:
    return proxy_binary("haproxy")


@pytest.fixture(scope="module", params=["nginx", "haproxy"])
def proxy(request: pytest.FixtureRequest) -> Proxy:
    """Each proxy in turn, for what the front does whichever runs it."""
    return Proxy(request.param, proxy_binary(request.param))


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

    def __init__(self, proxy: Proxy | str, upstream: str, *args: str) -> None:
        if isinstance(proxy, str):  # an nginx binary
            proxy = Proxy("nginx", proxy)
        ports = ["--port", "0", "--metrics-port", "0"]
        argv = ["front", f"--{proxy.engine}", proxy.binary, *ports, "--upstream", upstream]
        self.proc, match = start_ready([*argv, *args], READY)
        self.target = f"{match[1]}:{match[2]}"
        self.metrics = match[3]
        self.proxy_pid = int(match[4])
        # nginx retitles itself ("nginx: master process /usr/sbin/nginx -p DIR ..."); HAProxy
        # keeps its command line ("... -f DIR/haproxy.cfg").
        title = Path(f"/proc/{self.proxy_pid}/cmdline").read_bytes().replace(b"\0", b" ")
        found = re.search(r" -p (\S+)| -f (\S+)/haproxy\.cfg", title.decode())
        self.prefix = Path(found[1] or found[2])  # its own directory

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


def slow_server(
    seconds: float, max_inflight: int = 8
) -> tuple[grpc.aio.Server, int, CollectorRegistry]:
    """A real server in this process whose ranker takes ``seconds`` a call, serving."""
    registry = CollectorRegistry()
    server, port = create_server(
        ServerConfig(port=0, max_inflight=max_inflight),
        SnapshotHolder(slow_snapshot(seconds)),
        registry,
    )
    server.mark_serving()
    return server, port, registry


def served_ok(registry: CollectorRegistry) -> float:
    """Recommend calls a :func:`slow_server` answered OK."""
    value = registry.get_sample_value(
        "slimrank_grpc_requests_total", {"method": RECOMMEND, "code": "OK"}
    )
    return value or 0


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
    # 31 / 60 * 60 is 31.000000000000004 in floating point: still 31 a minute.
    assert nginx_rate(31 / 60) == "31r/m"
    assert nginx_rate(125 / 60) == "125r/m"
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
        ([], "one of the arguments --in-flight --rate is required"),
        (["--in-flight", "2", "--rate", "10"], "argument --rate: not allowed with"),
        (["--in-flight", "0"], "--in-flight"),
        (["--in-flight", "2", "--queue", "0"], "--queue"),
        (["--in-flight", "2", "--queue-timeout-ms", "0"], "--queue-timeout-ms"),
        (["--in-flight", "2", "--burst", "5"], "--burst goes with --rate"),
        (["--in-flight", "2", "--nginx-workers", "2"], "--nginx-workers goes with --rate"),
        (["--in-flight", "2", "--max-message-bytes", "2048"], "--max-message-bytes goes"),
        (["--rate", "10", "--queue", "3"], "--queue goes with --in-flight"),
        (["--rate", "10", "--queue-timeout-ms", "30"], "--queue-timeout-ms goes"),
        (["--in-flight", "2", "--retry-after-ms", "1e300"], "--retry-after-ms"),
        (["--in-flight", "2", "--upstream", "a.example:1,A.example:1"], "--upstream"),
        (["--in-flight", "2", "--port", "0", "--print-config"], "--port"),
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


def test_a_missing_haproxy_is_named_with_how_to_install_it(tmp_path: Path) -> None:
    result = front_cli("--in-flight", "2", "--haproxy", str(tmp_path / "no-haproxy"))
    assert result.returncode == 2, result.stderr
    assert "haproxy not found" in result.stderr and "install_haproxy.sh" in result.stderr


def test_a_config_takes_exactly_one_limit() -> None:
    for bad in ({}, {"rate": 10, "in_flight": 2}):
        with pytest.raises(ValueError, match="either a rate"):
            FrontConfig(**bad)
    assert FrontConfig(rate=10).engine == "nginx"
    assert FrontConfig(in_flight=2).engine == "haproxy"
    with pytest.raises(ValueError, match="nginx front needs a rate"):
        render(FrontConfig(in_flight=2), "/tmp/x", 50050, 5140)
    with pytest.raises(ValueError, match="HAProxy front needs in_flight"):
        haproxy_conf.render(FrontConfig(rate=10), "/tmp/x", 50050, 5140)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"in_flight": 2, "upstream": "h.example:65536"}, "upstream"),
        ({"rate": 10, "port": 65536}, "port"),
        ({"in_flight": 2, "queue": 10_001}, "queue"),
        ({"in_flight": 2, "worker_processes": 2}, "worker_processes"),
        ({"rate": 10, "upstream": "127.0.0.1:1", "upstream_ca": "/ca.pem"}, "upstream_name"),
        ({"rate": 10, "upstream": "[::1]:1", "upstream_ca": "/ca.pem"}, "upstream_name"),
        ({"rate": 10, "upstream": "h.example:1", "upstream_ca": "/ca.pem;x"}, "upstream_ca"),
        (
            {"rate": 10, "upstream": "h.example:1", "upstream_ca": "/ca", "upstream_name": "a;b"},
            "upstream_name",
        ),
        ({"rate": 10, "metrics_host": "a b"}, "metrics_host"),
        ({"rate": 10, "retry_after_s": 3600.5}, "retry_after_s"),
    ],
    ids=lambda v: "" if isinstance(v, str) else ",".join(f"{k}={w}" for k, w in v.items()),
)
def test_a_config_past_its_ranges_or_unsafe_in_a_proxy_config_is_named(
    fields: dict, named: str
) -> None:
    """Each field's limit, a worker count the queue front would ignore, an IP upstream whose
    certificate name is missing, and a ';' that would end a directive in the rendered config
    are refused naming the field; the values at the limits are accepted."""
    with pytest.raises(ValueError) as err:
        FrontConfig(**fields)
    assert err.value.field == named, err.value
    FrontConfig(in_flight=2, queue=10_000, upstream="h.example:65535", retry_after_s=3600)
    FrontConfig(rate=10, port=65535, upstream="127.0.0.1:1", upstream_ca="/ca", upstream_name="h")


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
    # The front's own answer to a request over its size limit (a 200 in gRPC form).
    assert outcome("<190>slimrank_front: TOO_LARGE 413 - -") == "other"
    assert outcome("<190>slimrank_front: PASSED 499 - -") == "other"
    assert outcome("garbage") is None
    assert outcome("<190>slimrank_front: PASSED 200") is None


def test_queue_log_lines_are_read_as_outcomes() -> None:
    read = haproxy_conf.outcome
    line = "<134>Dec  3 08:00:00 slimrank_front[12]: "
    assert read(line + "1 200 - LR--") == "refused"
    assert read(line + "0 200 - ----") == "forwarded"
    # The server's own answers: INVALID_ARGUMENT is an answer, RESOURCE_EXHAUSTED a refusal.
    assert read(line + "0 200 3 ----") == "forwarded"
    assert read(line + "0 200 8 ----") == "server_refused"
    assert read(line + "2 200 - sQ--") == "queue_timeout"
    assert read(line + "0 503 - SC--") == "upstream_error"
    assert read(line + "0 502 - SH--") == "upstream_error"
    assert read(line + "0 -1 - CD--") == "other"
    assert read(line + "0 200 - CD--") == "other"
    # The server reset the stream or closed the connection after its headers: a failure the
    # caller sees, not a forwarded answer.
    assert read(line + "0 200 - SD--") == "upstream_error"
    assert read(line + "0 200 - sD--") == "upstream_error"
    assert read(line + "0 200 - PD--") == "other"
    assert read("garbage") is None
    assert read(line + "0 200 -") is None
    assert read(line + "3 200 - ----") is None
    assert read(line + "01 200 - ----") is None


def haproxy_check(haproxy: str, text: str, prefix: Path) -> subprocess.CompletedProcess:
    conf = prefix / "haproxy.cfg"
    conf.write_text(text)
    return subprocess.run(
        [haproxy, "-c", "-f", str(conf)], capture_output=True, text=True, timeout=60
    )


def test_haproxy_accepts_the_rendered_config(haproxy: str, certs: Path, tmp_path: Path) -> None:
    plain = FrontConfig(in_flight=2, queue=3, queue_timeout_ms=40, upstream="[::1]:9")
    text = haproxy_conf.render(plain, str(tmp_path), 50050, 5140)
    result = haproxy_check(haproxy, text, tmp_path)
    assert result.returncode == 0 and "WARNING" not in result.stdout + result.stderr, result
    assert "maxconn 2\n" in text and "queue(slimrank_limited) ge 3\n" in text
    assert "timeout queue 40ms" in text
    tls = FrontConfig(
        in_flight=4,
        upstream="127.0.0.1:9",
        tls=TLSConfig(str(certs / "server.pem"), str(certs / "server.key"), str(certs / "ca.pem")),
        upstream_ca=str(certs / "ca.pem"),
        upstream_cert=str(certs / "client.pem"),
        upstream_key=str(certs / "client.key"),
        upstream_name="localhost",
    )
    write_pems(tls, tmp_path)
    assert (tmp_path / haproxy_conf.FRONT_PEM).stat().st_mode & 0o077 == 0  # a private key
    result = haproxy_check(haproxy, haproxy_conf.render(tls, str(tmp_path), 50050, 5140), tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_printed_queue_config_is_one_haproxy_accepts(haproxy: str, tmp_path: Path) -> None:
    result = front_cli("--in-flight", "4", "--queue", "2", "--port", "50050", "--print-config")
    assert result.returncode == 0, result.stderr
    assert "maxconn 4\n" in result.stdout
    check = haproxy_check(haproxy, result.stdout.replace(PRINTED_PREFIX, str(tmp_path)), tmp_path)
    assert check.returncode == 0, check.stderr


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


def test_forwarded_calls_are_answered_as_the_server_answers_them(proxy: Proxy, server) -> None:
    front = Front(proxy, server.target, *proxy.open_limit)
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
        if proxy.engine == "nginx":
            assert front.gauge("slimrank_front_rate_limit") == 1000
        else:
            assert front.gauge("slimrank_front_in_flight_limit") == 64
            assert front.gauge("slimrank_front_queue_limit") == 48
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
            # One bucket for every caller: another address finds it full too.
            head = raw_http2_post(front.target, RECOMMEND, source="127.0.0.2")
            assert "grpc-status: 8" in head, head
            for _ in range(20):
                assert client.health() == "SERVING"
                assert client.health("slimrank.v1.Recommender") == "SERVING"
                assert client.model_info().n_items == 300
    finally:
        front.close()


def test_calls_past_the_servers_places_and_the_queue_are_refused_at_once(haproxy: str) -> None:
    # A real server (in this process) whose ranker takes 0.5 s a call; the front lets one call
    # at a time reach it and two wait: of 10 calls at once, 3 are answered and 7 refused by
    # the front before the first answer comes back.
    server, port, registry = slow_server(0.5)
    front = Front(
        Proxy("haproxy", haproxy),
        f"127.0.0.1:{port}",
        *("--in-flight", "1", "--queue", "2", "--queue-timeout-ms", "30000"),
    )
    try:
        finished: list[str] = []
        with SlimrankClient(front.target, timeout=30, retries=0) as client:
            start = threading.Barrier(10)

            def call(i: int) -> grpc.RpcError | None:
                start.wait()
                try:
                    client.recommend(f"u{i}", 5)
                except grpc.RpcError as err:
                    finished.append("refused")
                    return err
                finished.append("answered")
                return None

            with ThreadPoolExecutor(10) as pool:
                results = pool.map(call, range(10))
                deadline = time.monotonic() + 20
                while finished.count("refused") < 7 and time.monotonic() < deadline:
                    time.sleep(0.01)
                # The queue is full and the server busy: health and Admin calls still pass.
                assert client.health() == "SERVING"
                assert client.model_info().version == "v1"
                # On the wire the refusal is gRPC's trailers-only answer (stricter clients
                # than Python's need its content-type).
                head = raw_http2_post(front.target, RECOMMEND)
                assert head.startswith("http/2 200"), head
                assert "content-type: application/grpc" in head and "grpc-status: 8" in head
                results = list(results)
        assert finished == ["refused"] * 7 + ["answered"] * 3, finished
        for err in (r for r in results if r is not None):
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.details() == QUEUE_MESSAGE
            assert retry_delay_s(err) == pytest.approx(0.05)
            assert ("grpc-retry-pushback-ms", "50") in [
                (m.key, m.value) for m in err.trailing_metadata()
            ]
        assert served_ok(registry) == 3
        expected = outcomes(forwarded=3, refused=8)  # curl's call included
        assert front.calls_when(expected) == expected
    finally:
        front.close()
        server.shutdown(0).wait(10)


def test_each_server_of_several_gets_its_own_calls_in_flight(haproxy: str) -> None:
    # Two real servers (as two worker processes on their own ports would be), each taking
    # 0.5 s a call: with --in-flight 1 each and a queue of 1, of 6 calls at once one runs at
    # each server, one waits, and three are refused.
    servers = [slow_server(0.5), slow_server(0.5)]
    upstream = ",".join(f"127.0.0.1:{port}" for _, port, _ in servers)
    front = Front(
        Proxy("haproxy", haproxy),
        upstream,
        *("--in-flight", "1", "--queue", "1", "--queue-timeout-ms", "30000"),
    )
    try:
        with SlimrankClient(front.target, timeout=30, retries=0) as client:
            start = threading.Barrier(6)

            def call(i: int) -> grpc.StatusCode:
                start.wait()
                try:
                    client.recommend(f"u{i}", 5)
                except grpc.RpcError as err:
                    return err.code()
                return grpc.StatusCode.OK

            with ThreadPoolExecutor(6) as pool:
                codes = list(pool.map(call, range(6)))
        assert codes.count(grpc.StatusCode.OK) == 3, codes
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 3, codes
        assert sorted(served_ok(registry) for _, _, registry in servers) == [1, 2]
    finally:
        front.close()
        for server, _, _ in servers:
            server.shutdown(0).wait(10)


def connections_to(port: int) -> set[int]:
    """Local ports of the established TCP connections to ``port`` on loopback, from
    ``/proc/net/tcp`` (the proxy's connections to a server)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if state == "01" and int(remote.split(":")[1], 16) == port:  # 01: ESTABLISHED
            found.add(int(local.split(":")[1], 16))
    return found


def test_a_server_that_recycles_its_connections_loses_no_call_through_the_front(
    proxy: Proxy, tmp_path: Path
) -> None:
    """The server closes each connection after 0.2 s of age or 0.1 s idle (GOAWAY, as
    --max-connection-age does every 30 minutes in production): the proxy opens new ones and
    no call reaches the caller as an error, including calls sent as a connection closes."""
    root = tmp_path / "bundles"
    publish(root, random_flat_bundle("a", seed=3))
    recycling = ("--max-connection-age", "0.2", "--max-connection-idle", "0.1")
    server = Server(["--bundles", str(root), "--metrics-port", "0", *recycling])
    server_port = int(server.target.rsplit(":", 1)[1])
    front = Front(proxy, server.target, *proxy.open_limit)
    codes: dict[str, int] = {}
    seen: set[int] = set()
    try:
        with SlimrankClient(front.target, timeout=10, retries=0) as client:
            deadline = time.monotonic() + 3
            i = 0
            while time.monotonic() < deadline:
                try:
                    client.recommend(f"u{i % 40}", 5)
                    name = "OK"
                except grpc.RpcError as err:
                    name = err.code().name
                codes[name] = codes.get(name, 0) + 1
                seen |= connections_to(server_port)
                i += 1
                if i % 40 == 0:
                    time.sleep(0.15)  # idle past --max-connection-idle
    finally:
        front.close()
        server.terminate()
    assert set(codes) == {"OK"} and codes["OK"] >= 100, codes
    # The server did close connections: the proxy reached it over many in 3 s.
    assert len(seen) >= 5, seen


def test_several_upstreams_are_checked_and_rendered() -> None:
    config = FrontConfig(in_flight=2, upstream="127.0.0.1:9001, 127.0.0.1:9002")
    assert config.upstreams == ["127.0.0.1:9001", "127.0.0.1:9002"]
    text = haproxy_conf.render(config, "/tmp/x", 50050, 5140)
    assert "server slimrank0 127.0.0.1:9001 proto h2 maxconn 2 check inter 1s" in text
    assert "server slimrank1 127.0.0.1:9002 proto h2 maxconn 2 check inter 1s" in text
    assert "option redispatch 1" in text and "retries 0" not in text
    nginx_text = render(FrontConfig(rate=10, upstream=config.upstream), "/tmp/x", 50050, 5140)
    assert "server 127.0.0.1:9001;" in nginx_text and "server 127.0.0.1:9002;" in nginx_text
    same = ("127.0.0.1:9001,127.0.0.1:9001", "Host.example:9001,host.EXAMPLE:09001")
    for bad in ("127.0.0.1:9001,", "a:1,b", *same):
        with pytest.raises(ValueError, match="upstream"):
            FrontConfig(in_flight=2, upstream=bad)
    with pytest.raises(ValueError, match="different hosts"):
        FrontConfig(in_flight=2, upstream="a.example:1,b.example:1", upstream_ca="/ca.pem")
    FrontConfig(in_flight=2, upstream="a.example:1,a.example:2", upstream_ca="/ca.pem")


def raw_http2_post(target: str, path: str, source: str | None = None) -> str:
    """The response head of an empty HTTP/2 POST (curl, prior knowledge), lower-cased;
    ``source``: the local address to send it from."""
    curl = shutil.which("curl")
    if curl is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("curl is missing in CI")
        pytest.skip("curl is not installed")
    result = subprocess.run(
        [
            *(curl, "-sS", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "-X", "POST"),
            *("-H", "content-type: application/grpc", f"http://{target}{path}"),
            *(() if source is None else ("--interface", source)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout.lower()


def test_a_dead_server_among_several_gets_no_calls(haproxy: str, server) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    front = Front(Proxy("haproxy", haproxy), f"{dead},{server.target}", "--in-flight", "4")
    try:
        with SlimrankClient(front.target, timeout=10, retries=0) as client:
            for i in range(12):  # each one retried on the live server, then the dead one out
                client.recommend(f"u{i}", 3)
        expected = outcomes(forwarded=12)
        assert front.calls_when(expected) == expected
    finally:
        front.close()


def test_every_server_down_is_unavailable_not_a_refusal(haproxy: str) -> None:
    """With every server taken out by its check, HAProxy's 503 names no server, as a queue
    timeout's does: the caller still sees UNAVAILABLE, never the front's busy refusal."""
    dead = []
    for _ in range(2):  # ports nothing listens on
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dead.append(f"127.0.0.1:{sock.getsockname()[1]}")
    front = Front(Proxy("haproxy", haproxy), ",".join(dead), "--in-flight", "4")
    try:
        time.sleep(3)  # two failed checks a second apart take both servers out
        with SlimrankClient(front.target, timeout=10, retries=0) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.recommend("u1", 3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        expected = outcomes(upstream_error=1)
        assert front.calls_when(expected) == expected
    finally:
        front.close()


def test_a_call_queued_past_its_timeout_is_refused_and_counted(haproxy: str) -> None:
    server, port, registry = slow_server(1.0)
    front = Front(
        Proxy("haproxy", haproxy),
        f"127.0.0.1:{port}",
        *("--in-flight", "1", "--queue", "4", "--queue-timeout-ms", "200"),
    )
    try:
        with SlimrankClient(front.target, timeout=30, retries=0) as client:
            start = threading.Barrier(3)

            def call(i: int) -> grpc.RpcError | None:
                start.wait()
                try:
                    client.recommend(f"u{i}", 5)
                except grpc.RpcError as err:
                    return err
                return None

            with ThreadPoolExecutor(3) as pool:
                results = list(pool.map(call, range(3)))
        refused = [r for r in results if r is not None]
        assert len(refused) == 2, results
        for err in refused:  # after waiting 0.2 s, as the front's own refusal
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.details() == QUEUE_MESSAGE
            assert retry_delay_s(err) == pytest.approx(0.05)
        assert served_ok(registry) == 1
        expected = outcomes(forwarded=1, queue_timeout=2)
        assert front.calls_when(expected) == expected
    finally:
        front.close()
        server.shutdown(0).wait(10)


def test_an_unreachable_server_is_unavailable_and_counted(proxy: Proxy) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    front = Front(proxy, dead, *proxy.open_limit)
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


def test_a_stop_ends_the_proxy_and_removes_its_directory(proxy: Proxy, server) -> None:
    front = Front(proxy, server.target, *proxy.open_limit)
    assert front.prefix.is_dir()
    with SlimrankClient(front.target, timeout=10, retries=0) as client:
        client.recommend("u2", 3)
    code, err = front.stop(signal.SIGTERM)
    assert code == 0, err
    assert group_gone(front.proxy_pid), "the proxy (or nginx's workers) outlived its front"
    assert not front.prefix.exists()


def test_a_stop_waits_for_calls_in_flight_for_the_grace_only(proxy: Proxy) -> None:
    # A server that accepts connections and never answers: the call stays in flight.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        upstream = f"127.0.0.1:{silent.getsockname()[1]}"
        front = Front(proxy, upstream, *proxy.open_limit, "--grace", "1")
        errors: list[grpc.RpcError] = []

        def call() -> None:
            with SlimrankClient(front.target, timeout=60, retries=0) as client:
                try:
                    client.recommend("u1", 3)
                except grpc.RpcError as err:
                    errors.append(err)

        caller = threading.Thread(target=call)
        caller.start()
        conn, _ = silent.accept()  # the proxy forwarded the call
        started = time.monotonic()
        code, err = front.stop(signal.SIGTERM)
        took = time.monotonic() - started
        caller.join(30)
        conn.close()
    assert code == 0, err
    # The grace (1 s), then SIGTERM and at most its 5 s wait: not the call's 60 s deadline.
    assert 0.9 < took < 10, took
    assert errors and errors[0].code() != grpc.StatusCode.OK
    assert group_gone(front.proxy_pid)


def test_a_killed_front_takes_its_proxy_with_it_and_the_next_removes_its_directory(
    proxy: Proxy, server
) -> None:
    front = Front(proxy, server.target, *proxy.open_limit)
    front.stop(signal.SIGKILL)
    assert group_gone(front.proxy_pid), "the proxy outlived its front"
    assert front.prefix.is_dir()  # a killed front cannot remove it (its TLS copies inside)
    alive = Front(proxy, server.target, *proxy.open_limit)  # running while the next starts
    following = Front(proxy, server.target, *proxy.open_limit)
    try:
        assert not front.prefix.exists()
        assert alive.prefix.is_dir() and following.prefix.is_dir()
    finally:
        following.close()
        alive.close()
        shutil.rmtree(front.prefix, ignore_errors=True)


def test_only_the_directories_of_dead_fronts_are_removed(tmp_path: Path) -> None:
    """A directory is kept while the process named by its pid and start time runs; a reused
    pid (a later process, as a container's pid 1 after a restart) does not keep it."""
    child = subprocess.Popen(["true"])
    child.wait()
    me, parent = process_tag(os.getpid()), process_tag(os.getppid())
    assert me is not None and parent is not None
    assert process_tag(child.pid) is None
    pid, ticks = me.split(".")
    assert int(pid) == os.getpid() and int(ticks) > 0
    dead = tmp_path / f"slimrank-front-{child.pid}.{ticks}-abc"
    # This very pid, started earlier: the directory of a killed front whose pid came back.
    reused = tmp_path / f"slimrank-front-{pid}.{int(ticks) - 1}-rst"
    mine = tmp_path / f"slimrank-front-{me}-def"
    theirs = tmp_path / f"slimrank-front-{parent}-ghi"
    others = [
        tmp_path / "slimrank-front-xyz",
        tmp_path / "slimrank-front-12x-a",
        tmp_path / f"slimrank-front-{child.pid}-old",  # no start time: not a front's name
        tmp_path / "x",
    ]
    for path in (dead, reused, mine, theirs, *others):
        path.mkdir()
    (dead / "front.pem").write_text("key")
    (reused / "front.pem").write_text("key")
    link = tmp_path / f"slimrank-front-{child.pid}.{ticks}-link"
    link.symlink_to(mine)
    assert remove_stale_dirs(tmp_path) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    assert all(p.exists() for p in (mine, theirs, link, *others))


def test_a_front_whose_proxy_dies_exits_and_leaves_no_worker(proxy: Proxy, server) -> None:
    front = Front(proxy, server.target, *proxy.open_limit)
    host, port = front.target.rsplit(":", 1)
    os.kill(front.proxy_pid, signal.SIGKILL)  # nginx's master only: its workers live on
    code = front.proc.wait(timeout=30)
    assert code == 1
    # Checked first: an orphaned worker would also hold the front's stderr open.
    assert group_gone(front.proxy_pid), "the proxy's workers outlived their master and front"
    stderr = front.proc.stderr.read() if front.proc.stderr else ""
    assert f"{proxy.engine} exited by itself" in stderr
    with pytest.raises(OSError):  # nobody serves the port any more
        socket.create_connection((host, int(port)), timeout=2).close()
    assert not front.prefix.exists()


def test_a_port_in_use_is_a_clear_error(proxy: Proxy, server) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = front_cli(
            *(f"--{proxy.engine}", proxy.binary, *proxy.open_limit),
            *("--upstream", server.target, "--port", str(port)),
        )
    assert result.returncode == 2, result.stderr
    assert "front on" not in result.stdout
    assert f"slimrank: error: cannot listen for gRPC on 127.0.0.1:{port}: " in result.stderr
    assert "Traceback" not in result.stderr


def test_a_metrics_port_in_use_is_a_clear_error(proxy: Proxy, server) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = front_cli(
            *(f"--{proxy.engine}", proxy.binary, *proxy.open_limit),
            *("--upstream", server.target, "--port", "0", "--metrics-port", str(port)),
        )
    assert result.returncode == 2, result.stderr
    assert f"slimrank: error: cannot listen for metrics on 127.0.0.1:{port}: " in result.stderr
    assert "Traceback" not in result.stderr


def test_a_request_over_the_size_limit_is_a_grpc_refusal_the_client_does_not_retry(
    proxy: Proxy, server
) -> None:
    # nginx (--rate) refuses a body over --max-message-bytes itself; its own HTTP 413 would
    # reach a gRPC caller as UNKNOWN, so it answers RESOURCE_EXHAUSTED naming the limit, with
    # a negative retry pushback that stops the client's retry policy. HAProxy leaves the limit
    # to the server, whose own answer passes through. Either way the front goes on serving.
    limit = 65536
    extra = ("--max-message-bytes", str(limit)) if proxy.engine == "nginx" else ()
    front = Front(proxy, server.target, *proxy.open_limit, *extra)
    # nginx: about 100 kB, over the front's limit, under gRPC's 256 kB retry buffer (a larger
    # message is never retried, pushback or not). HAProxy: over the server's 1 MiB.
    recent = [f"item{i:07d}" for i in range(8_000 if proxy.engine == "nginx" else 90_000)]
    try:
        with SlimrankClient(front.target, timeout=10, retries=3) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.recommend("nobody", 5, recent=recent)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            if proxy.engine == "nginx":
                config = FrontConfig(rate=1000, max_message_bytes=limit)
                assert err.value.details() == too_large_message(config)
                assert str(limit) in err.value.details()
                trailers = dict((m.key, m.value) for m in err.value.trailing_metadata())
                assert trailers["grpc-retry-pushback-ms"] == "-1"
                # Any other path over the limit gets the same answer, and is not counted
                # among the Recommender calls.
                with grpc.insecure_channel(front.target) as channel:
                    check = channel.unary_unary(
                        "/grpc.health.v1.Health/Check",
                        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                        response_deserializer=health_pb2.HealthCheckResponse.FromString,
                    )
                    with pytest.raises(grpc.RpcError) as health_err:
                        check(health_pb2.HealthCheckRequest(service="x" * 100_000), timeout=10)
                assert health_err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert health_err.value.details() == too_large_message(config)
            else:
                assert "larger than max" in err.value.details()
            assert client.recommend("u0", 3).item_ids
            assert client.health() == "SERVING"
        # One refused call: the client did not retry it.
        if proxy.engine == "nginx":
            expected = outcomes(forwarded=1, other=1)
        else:
            expected = outcomes(forwarded=1, server_refused=1)
        assert front.calls_when(expected) == expected
    finally:
        front.close()


def test_metadata_over_the_servers_limit_does_not_end_the_callers_connection(
    proxy: Proxy, server
) -> None:
    # 24 kB of metadata is over gRPC's hard limit at the server (16 kB): called directly, the
    # server answers RESOURCE_EXHAUSTED. Through the front the call must reach the server and
    # get its answer, never a GOAWAY that ends the caller's connection and every call on it
    # (UNAVAILABLE: nginx's 8 kB and HAProxy's 16 kB header buffers did that). The server's
    # limit counts HPACK-encoded bytes, which nginx re-encodes, so through nginx the call may
    # also pass: either way the channel goes on serving.
    front = Front(proxy, server.target, *proxy.open_limit)
    request = recommender_pb2.RecommendRequest(user_id="u0", k=3)
    big = [("x-big", "".join(np.random.default_rng(0).choice(list("ABCDEFGHIJKLMNOP"), 24_000)))]
    try:
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as err:
                recommender_pb2_grpc.RecommenderStub(channel).Recommend(
                    request, metadata=big, timeout=10
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with grpc.insecure_channel(front.target) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            for _ in range(3):
                try:
                    assert len(stub.Recommend(request, metadata=big, timeout=10).items) == 3
                except grpc.RpcError as got:
                    assert got.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, got
                    assert "metadata size exceeds" in got.details()
                assert len(stub.Recommend(request, timeout=10).items) == 3
    finally:
        front.close()


def test_calls_the_server_refuses_are_counted_as_its_refusals(proxy: Proxy) -> None:
    # A real server (in this process) that takes one call of 50 ms at a time and refuses
    # the rest itself; the front lets every call through.
    server, port, _ = slow_server(0.05, max_inflight=1)
    front = Front(proxy, f"127.0.0.1:{port}", *proxy.open_limit)
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
        # The server's, not the front's.
        assert refused and not {RATE_MESSAGE, QUEUE_MESSAGE} & set(refused)
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


def test_mutual_tls_on_both_sides(proxy: Proxy, certs: Path, tls_server) -> None:
    front = Front(
        proxy,
        tls_server.target,
        *proxy.open_limit,
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
        if proxy.engine == "nginx":
            # nginx asks for the certificate in the handshake and answers HTTP 400 without.
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "400" in (err.value.details() or "")
        else:  # HAProxy fails the handshake itself
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
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
    proxy: Proxy, certs: Path, tls_server, upstream_flags: list[str]
) -> None:
    flags = [str(certs / f) if f.endswith((".pem", ".key")) else f for f in upstream_flags]
    front = Front(proxy, tls_server.target, *proxy.open_limit, *flags)
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
        (
            [
                *("--upstream-tls-ca", "ca.pem", "--upstream-tls-name", "localhost"),
                *("--upstream-tls-cert", "client.pem", "--upstream-tls-key", "missing.key"),
            ],
            "--upstream-tls-key",
        ),
    ],
)
def test_bad_tls_flags_are_refused_by_name(certs: Path, args: list[str], named: str) -> None:
    result = front_cli(
        "--rate", "10", *[str(certs / a) if "." in a and a != "localhost" else a for a in args]
    )
    assert result.returncode == 2, result.stderr
    assert f"error: {named}" in result.stderr, result.stderr


def test_relative_tls_paths_reach_the_proxy_absolute(
    nginx: str, certs: Path, tmp_path: Path
) -> None:
    """The proxy reads paths from its own directory: the front's relative certificate paths
    (from the caller's directory) are printed absolute, and nginx reads them there."""
    result = subprocess.run(
        [
            *(*FRONT, "--rate", "10", "--port", "50050", "--print-config"),
            *("--tls-cert", "server.pem", "--tls-key", "server.key"),
            *("--upstream-tls-ca", "ca.pem", "--upstream-tls-name", "localhost"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=certs,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"ssl_certificate {certs / 'server.pem'};" in text
    assert f"ssl_certificate_key {certs / 'server.key'};" in text
    assert f"grpc_ssl_trusted_certificate {certs / 'ca.pem'};" in text
    check = nginx_check(nginx, tmp_path, text.replace(PRINTED_PREFIX, str(tmp_path)))
    assert check.returncode == 0, check.stderr
