"""TLS, mutual TLS and the admin token, on the real server through the real client."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.proto.slimrank.v1 import admin_pb2, admin_pb2_grpc
from slimrank.serving.security import (
    AdminAuthInterceptor,
    TLSConfig,
    channel_credentials,
    read_token,
    server_credentials,
)
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import SnapshotHolder, random_snapshot

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gen_certs.sh"
TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA with a server cert (localhost, 127.0.0.1) and a client cert."""
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(SCRIPT), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def serve() -> Iterator[Callable[..., int]]:
    """Start servers (SERVING) with the given credentials and interceptors; return the port."""
    servers = []

    def _serve(
        credentials: grpc.ServerCredentials | None = None,
        interceptors: tuple[grpc.ServerInterceptor, ...] = (),
    ) -> int:
        holder = SnapshotHolder(random_snapshot("v1", dim=8))
        server, port = create_server(
            ServerConfig(),
            holder,
            CollectorRegistry(),
            reload_fn=lambda version: random_snapshot("v2", dim=8),
            credentials=credentials,
            interceptors=interceptors,
        )
        server.mark_serving()
        servers.append(server)
        return port

    yield _serve
    for server in servers:
        server.shutdown(0).wait(5)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_tls_call_works_and_a_plaintext_client_is_refused(
    certs: Path, serve: Callable[..., int]
) -> None:
    port = serve(
        server_credentials(TLSConfig(str(certs / "server.pem"), str(certs / "server.key")))
    )
    tls = channel_credentials(certs / "ca.pem")
    with SlimrankClient(f"127.0.0.1:{port}", timeout=5.0, retries=0, tls=tls) as client:
        assert client.recommend("u1", 3).model_version == "v1"
    with SlimrankClient(f"127.0.0.1:{port}", timeout=5.0, retries=0) as plain:
        assert code_of(lambda: plain.recommend("u1", 3)) == grpc.StatusCode.UNAVAILABLE


def test_tls_client_refuses_a_server_signed_by_another_ca(
    certs: Path, tmp_path: Path, serve: Callable[..., int]
) -> None:
    subprocess.run(["bash", str(SCRIPT), str(tmp_path)], check=True, capture_output=True)
    port = serve(
        server_credentials(TLSConfig(str(certs / "server.pem"), str(certs / "server.key")))
    )
    other = channel_credentials(tmp_path / "ca.pem")
    with SlimrankClient(f"127.0.0.1:{port}", timeout=5.0, retries=0, tls=other) as client:
        assert code_of(lambda: client.recommend("u1", 3)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(certs: Path, serve: Callable[..., int]) -> None:
    tls = TLSConfig(str(certs / "server.pem"), str(certs / "server.key"), str(certs / "ca.pem"))
    port = serve(server_credentials(tls))
    target = f"127.0.0.1:{port}"
    with_cert = channel_credentials(certs / "ca.pem", certs / "client.pem", certs / "client.key")
    with SlimrankClient(target, timeout=5.0, retries=0, tls=with_cert) as client:
        assert client.recommend("u1", 3).model_version == "v1"
    without = channel_credentials(certs / "ca.pem")
    with SlimrankClient(target, timeout=5.0, retries=0, tls=without) as client:
        assert code_of(lambda: client.recommend("u1", 3)) == grpc.StatusCode.UNAVAILABLE


def test_admin_needs_the_bearer_token(serve: Callable[..., int]) -> None:
    port = serve(interceptors=(AdminAuthInterceptor(TOKEN),))
    target = f"127.0.0.1:{port}"
    with SlimrankClient(target, timeout=5.0, retries=0) as anonymous:
        assert code_of(anonymous.model_info) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(anonymous.reload) == grpc.StatusCode.UNAUTHENTICATED
        assert anonymous.recommend("u1", 3).model_version == "v1"  # Recommender is open
        assert anonymous.health() == "SERVING"
    with SlimrankClient(target, timeout=5.0, retries=0, admin_token="wrong") as wrong:
        assert code_of(wrong.reload) == grpc.StatusCode.UNAUTHENTICATED
    with SlimrankClient(target, timeout=5.0, retries=0, admin_token=TOKEN[:-1]) as prefix:
        assert code_of(prefix.model_info) == grpc.StatusCode.UNAUTHENTICATED
    with SlimrankClient(target, timeout=5.0, retries=0, admin_token=TOKEN) as admin:
        assert admin.model_info().version == "v1"
        assert admin.reload().version == "v2"


def test_admin_without_a_token_is_refused_unless_opened(serve: Callable[..., int]) -> None:
    closed = serve(interceptors=(AdminAuthInterceptor(None),))
    with SlimrankClient(f"127.0.0.1:{closed}", timeout=5.0, retries=0, admin_token="x") as c:
        assert code_of(c.model_info) == grpc.StatusCode.PERMISSION_DENIED
        assert c.recommend("u1", 3).model_version == "v1"
    opened = serve(interceptors=(AdminAuthInterceptor(None, allow_without_token=True),))
    with SlimrankClient(f"127.0.0.1:{opened}", timeout=5.0, retries=0) as c:
        assert c.model_info().version == "v1"


def test_token_and_tls_config_are_checked(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text(" \n")
    empty.chmod(0o600)
    with pytest.raises(ValueError, match="empty"):
        read_token(empty)
    empty.write_text(f"{TOKEN}\n")
    assert read_token(empty) == TOKEN
    with pytest.raises(ValueError, match=r"TLSConfig\.cert"):
        TLSConfig(str(tmp_path / "missing.pem"), str(empty))
    with pytest.raises(ValueError, match="both cert and key"):
        channel_credentials(None, cert=empty)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(serve: Callable[..., int], scheme: str) -> None:
    port = serve(interceptors=(AdminAuthInterceptor(TOKEN),))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = admin_pb2_grpc.AdminStub(channel).GetModelInfo
        request = admin_pb2.GetModelInfoRequest()
        for value in (f"{scheme} {TOKEN}", f"{scheme}  {TOKEN}"):
            metadata = (("authorization", value),)
            assert info(request, timeout=5, metadata=metadata).version == "v1"
        for value in (f"Basic {TOKEN}", f"{scheme}{TOKEN}", TOKEN, f"{scheme} {TOKEN}x"):
            metadata = (("authorization", value),)
            assert code_of(lambda m=metadata: info(request, timeout=5, metadata=m)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )


def test_the_metrics_port_serves_metrics_only_at_metrics() -> None:
    holder = SnapshotHolder(random_snapshot("v1", dim=8))
    server, _ = create_server(ServerConfig(metrics_port=0), holder, CollectorRegistry())
    base = f"http://127.0.0.1:{server.metrics_port}"
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            assert response.status == 200
            assert b"slimrank_index_items 500.0" in response.read()
        for path in ("/", "/metric", "/metrics/x", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"{base}{path}", timeout=5)
            assert info.value.code == 404
    finally:
        server.shutdown(0).wait(5)
