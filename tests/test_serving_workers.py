"""``slimrank serve --workers 2``: two processes on one port, one merged metrics endpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from serve_process import READY, Server

from slimrank.bundle import publish
from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.listen import ListenError
from slimrank.serving.loader import random_flat_bundle
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import SnapshotHolder, random_snapshot

RECOMMEND = "/slimrank.v1.Recommender/Recommend"
CONNECTIONS = 24


def requests_by_pid(metrics_dir: Path, pids: list[int]) -> dict[int, float]:
    """Recommend calls answered OK per worker, read from each worker's own metric file."""
    out = {}
    for pid in pids:
        total = 0.0
        for metric in MultiProcessCollector.merge([str(metrics_dir / f"counter_{pid}.db")]):
            for sample in metric.samples:
                if sample.name == "slimrank_grpc_requests_total" and sample.labels == {
                    "method": RECOMMEND,
                    "code": "OK",
                }:
                    total += sample.value
        out[pid] = total
    return out


def test_two_workers_share_the_port_and_both_answer(tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    version = publish(root, random_flat_bundle("a", seed=1))
    metrics_dir = tmp_path / "metrics"
    server = Server(
        ["--bundles", str(root), "--metrics-port", "0", "--workers", "2"],
        {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    try:
        target, metrics, pids = server.target, server.metrics, server.pids
        assert len(set(pids)) == 2 and server.proc.pid not in pids
        # Each new channel is a new TCP connection, which the kernel hands to either worker:
        # with its own subchannel pool (gRPC's global pool can hand a new channel the last
        # one's connection while it lingers; CI then saw all 24 calls on one worker).
        for i in range(CONNECTIONS):
            channel = grpc.insecure_channel(target, [("grpc.use_local_subchannel_pool", 1)])
            with SlimrankClient(target, timeout=10.0, channel=channel) as client:
                assert client.recommend(f"u{i}", 3).model_version == version
            channel.close()
        per_worker = requests_by_pid(metrics_dir, pids)
        assert sum(per_worker.values()) == CONNECTIONS
        assert all(n > 0 for n in per_worker.values()), per_worker
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
        merged = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        key = ("slimrank_grpc_requests_total", (("code", "OK"), ("method", RECOMMEND)))
        assert merged[key] == CONNECTIONS
        # Gauges merge across workers too: the served version and the index size, once each.
        assert merged[("slimrank_model_info", (("version", version),))] == 1
        assert ("slimrank_index_items", ()) in merged
    finally:
        code, err = server.terminate(timeout_s=90)
    assert code == 0, err
    # Each worker's INFO lines reach the parent's stderr, named by its pid (the CLI sets the
    # slimrank logger to INFO apart from the root's WARNING, and a spawned worker starts
    # with neither), and each exits without a traceback.
    for pid in pids:
        for line in ("serving", "shutting down", "stopped"):
            assert f"slimrank.serving.server[{pid}]: {line}" in err, err
    assert "Traceback" not in err, err


def free_port_pair() -> int:
    """A port that is free, with the next one free too (for ``--worker-ports``)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            try:
                with socket.socket() as second:
                    second.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise AssertionError("no two free ports in a row")


def test_each_worker_also_answers_alone_on_its_own_port(tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    publish(root, random_flat_bundle("a", seed=1))
    metrics_dir = tmp_path / "metrics"
    base = free_port_pair()
    server = Server(
        ["--bundles", str(root), "--workers", "2", "--worker-ports", str(base)],
        {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    try:
        seen = []
        for port in (base, base + 1):
            # New channels each time: every call on this port reaches the same one worker.
            for i in range(6):
                channel = grpc.insecure_channel(
                    f"127.0.0.1:{port}", [("grpc.use_local_subchannel_pool", 1)]
                )
                with SlimrankClient(f"127.0.0.1:{port}", timeout=10.0, channel=channel) as c:
                    c.recommend(f"u{i}", 3)
                channel.close()
            seen.append(sorted(requests_by_pid(metrics_dir, server.pids).values()))
        assert seen == [[0, 6], [6, 6]]
    finally:
        code, err = server.terminate(timeout_s=90)
    assert code == 0, err
    assert f"(and its own port {base})" in err and f"(and its own port {base + 1})" in err


def test_one_process_also_answers_on_its_own_port(tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    publish(root, random_flat_bundle("a", seed=1))
    base = free_port_pair()
    server = Server(["--bundles", str(root), "--worker-ports", str(base)])
    try:
        with SlimrankClient(f"127.0.0.1:{base}", timeout=10.0) as client:
            assert client.health() == "SERVING"
            client.recommend("u1", 3)
        assert server.target != f"127.0.0.1:{base}"
    finally:
        code, err = server.terminate(timeout_s=60)
    assert code == 0, err
    assert f"(and its own port {base})" in err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--workers", "2", "--worker-ports", "65535"], "--worker-ports 65535"),
        (["--workers", "2", "--worker-ports", "0"], "--worker-ports 0"),
        (["--port", "50070", "--workers", "2", "--worker-ports", "50069"], "is also --port"),
        (["--metrics-port", "50071", "--worker-ports", "50071"], "is also --metrics-port"),
    ],
)
def test_bad_worker_ports_are_refused_by_name(args: list[str], named: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "slimrank.cli", "serve", "--bundles", "nowhere", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_port_is_shared_only_when_every_server_asks_for_it() -> None:
    first, port = create_server(
        ServerConfig(so_reuseport=True), SnapshotHolder(random_snapshot("v1")), CollectorRegistry()
    )
    try:
        with pytest.raises(ListenError, match=f"cannot listen for gRPC on .*:{port}: in use"):
            create_server(
                ServerConfig(port=port), SnapshotHolder(random_snapshot("v2")), CollectorRegistry()
            )
        second, same = create_server(
            ServerConfig(port=port, so_reuseport=True),
            SnapshotHolder(random_snapshot("v2")),
            CollectorRegistry(),
        )
        assert same == port
        second.shutdown(0).wait(5)
    finally:
        first.shutdown(0).wait(5)


def test_sigterm_to_the_whole_process_group_drains_every_worker(tmp_path: Path) -> None:
    """A supervisor (systemd's default, `timeout`, a shell's Ctrl-C) signals every process of
    the group; the parent then forwards its own SIGTERM. A worker already draining must not
    be killed by that second signal."""
    root = tmp_path / "bundles"
    publish(root, random_flat_bundle("a", seed=1))
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "slimrank.cli", "serve", "--bundles", str(root)),
            *("--port", "0", "--metrics-port", "-1", "--workers", "2"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as under a supervisor
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")},
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = READY.search(line)
        assert match is not None, f"no ready line in {line!r}: {proc.stderr and proc.stderr.read()}"
        with SlimrankClient(f"{match[1]}:{match[2]}", timeout=10.0) as client:
            assert client.recommend("u1", 3).model_version
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err
    assert "exit codes" not in err, err
