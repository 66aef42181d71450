"""Idle connections against the real server: a fresh client is served while many are open,
and the server closes idle ones (max_connection_idle) and silent ones (handshake timeout).

Connections are counted from the kernel's table (/proc/net/tcp): the server side of each
ESTABLISHED TCP connection to the port.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import SnapshotHolder, random_snapshot

ESTABLISHED = "01"
N_IDLE = 200

pytestmark = pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="counts connections from /proc/net/tcp"
)


def server_side_connections(port: int) -> int:
    """ESTABLISHED TCP connections whose local port is ``port`` (IPv4 and IPv6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == ESTABLISHED and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_idle_and_silent_connections_are_closed_and_fresh_clients_served() -> None:
    config = ServerConfig(max_connection_idle_s=1.0, handshake_timeout_s=1.0)
    holder = SnapshotHolder(random_snapshot("v1", dim=8))
    server, port = create_server(config, holder, CollectorRegistry())
    server.mark_serving()
    target = f"127.0.0.1:{port}"
    channels: list[grpc.Channel] = []
    silent: list[socket.socket] = []
    try:
        # 200 HTTP/2 connections, each made by one call and then left idle: a local
        # subchannel pool gives every channel its own connection.
        for _ in range(N_IDLE):
            channel = grpc.insecure_channel(target, [("grpc.use_local_subchannel_pool", 1)])
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            channels.append(channel)
        # And 50 TCP connections that never send a byte.
        for _ in range(50):
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert server_side_connections(port) >= N_IDLE + 50 - 10  # some may already be closed
        with SlimrankClient(target, timeout=10.0) as fresh:
            assert fresh.recommend("u1", 3).model_version == "v1"
        # The server closes them all: idle HTTP/2 ones with GOAWAY, silent ones unshaken.
        assert wait_until(lambda: server_side_connections(port) == 0), (
            f"{server_side_connections(port)} connections still open"
        )
        for sock in silent:
            sock.settimeout(5)
            while sock.recv(4096):  # the server's HTTP/2 SETTINGS, then end of stream
                pass
        # A closed channel reconnects on its next call.
        reply = health_pb2_grpc.HealthStub(channels[0]).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for channel in channels:
            channel.close()
        for sock in silent:
            sock.close()
        server.shutdown(0).wait(5)


def test_connection_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_connection_idle_s"):
        ServerConfig(max_connection_idle_s=0)
    with pytest.raises(ValueError, match="max_connection_age_s"):
        ServerConfig(max_connection_age_s=-1)
    assert ServerConfig(max_connection_age_s=None).max_connection_age_s is None
