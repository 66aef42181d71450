"""``slimrank serve`` in a subprocess on port 0: load CURRENT, answer, follow CURRENT, SIGTERM."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from serve_process import Server

from slimrank.bundle import publish
from slimrank.cli import main
from slimrank.serving.client import SlimrankClient
from slimrank.serving.listen import GRPC_REASON
from slimrank.serving.loader import random_flat_bundle
from slimrank.serving.security import channel_credentials

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gen_certs.sh"
TOKEN = "t0ken-0123456789abcdef"  # at least 16 characters


def publish_flat(root: Path, prefix: str, seed: int) -> str:
    return publish(root, random_flat_bundle(prefix, seed=seed))


def corrupt(root: Path, version: str, name: str = "items.npy") -> None:
    """Flip one byte of a published (read-only) file."""
    path = root / version / name
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def launch() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def _launch(args: list[str], env: dict[str, str] | None = None) -> Server:
        servers.append(Server(args, env))
        return servers[-1]

    yield _launch
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate(timeout=30)


def test_serve_answers_follows_current_and_stops_cleanly_on_sigterm(
    tmp_path: Path, launch: Callable[..., Server]
) -> None:
    root = tmp_path / "bundles"
    v1 = publish_flat(root, "a", seed=1)
    token = tmp_path / "token"
    token.write_text(f"{TOKEN}\n")
    token.chmod(0o600)
    server = launch(
        [
            "--bundles",
            str(root),
            "--metrics-port",
            "0",
            "--poll-interval",
            "0.1",
            "--admin-token-file",
            str(token),
        ]
    )
    with SlimrankClient(server.target, timeout=10.0, admin_token=TOKEN) as client:
        assert client.health("slimrank.v1.Recommender") == "SERVING"
        got = client.recommend("u3", 5)
        assert got.model_version == v1 and len(got.item_ids) == 5
        v2 = publish_flat(root, "b", seed=2)
        deadline = time.monotonic() + 60  # the watcher polls every 0.1 s
        while client.model_info().version != v2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.recommend("u3", 5).model_version == v2
    assert server.metric("slimrank_model_reloads_total") == 1
    assert server.metric("slimrank_grpc_requests_total", {"code": "OK"}) >= 2
    code, err = server.terminate()
    assert code == 0, err
    assert "stopped" in err
    assert err.count("admin token is accepted over plaintext") == 1


def test_serve_with_mutual_tls_and_no_admin_token(
    tmp_path: Path, launch: Callable[..., Server], capsys: pytest.CaptureFixture[str]
) -> None:
    subprocess.run(["bash", str(SCRIPT), str(tmp_path)], check=True, capture_output=True)
    root = tmp_path / "bundles"
    v1 = publish_flat(root, "a", seed=1)
    server = launch(
        [
            "--bundles",
            str(root),
            "--metrics-port",
            "-1",
            "--tls-cert",
            str(tmp_path / "server.pem"),
            "--tls-key",
            str(tmp_path / "server.key"),
            "--tls-client-ca",
            str(tmp_path / "ca.pem"),
        ]
    )
    assert server.metrics is None
    tls = channel_credentials(tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key")
    with SlimrankClient(server.target, timeout=10.0, retries=0, tls=tls) as client:
        assert client.recommend("u3", 5).model_version == v1
        with pytest.raises(grpc.RpcError) as err:
            client.model_info()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # slimrank query through the same mutual TLS; without its client certificate it is refused.
    ca, cert, key = (str(tmp_path / name) for name in ("ca.pem", "client.pem", "client.key"))
    query = ["query", "--target", server.target, "--user", "u3", "-k", "5", "--timeout", "10"]
    capsys.readouterr()
    assert main([*query, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key]) == 0
    assert f"by model {v1}" in capsys.readouterr().out
    assert main([*query, "--tls-ca", ca]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert main(query) == 2  # plaintext to a TLS port
    code, stderr = server.terminate()
    assert code == 0, stderr


def test_serve_refuses_a_corrupt_current(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = publish_flat(tmp_path, "a", seed=1)
    corrupt(tmp_path, version)
    assert main(["serve", "--bundles", str(tmp_path), "--port", "0", "--metrics-port", "-1"]) == 2
    assert "items.npy" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "what", "extra"),
    [
        ("--port", "gRPC", []),
        ("--metrics-port", "metrics", ["--port", "0"]),
        ("--http-port", "HTTP/JSON", ["--port", "0"]),
        ("--port", "gRPC", ["--workers", "2"]),
        ("--metrics-port", "metrics", ["--port", "0", "--workers", "2"]),
        ("--http-port", "HTTP/JSON", ["--port", "0", "--workers", "2"]),
    ],
)
def test_serve_names_a_port_it_cannot_listen_on(
    tmp_path: Path, flag: str, what: str, extra: list[str]
) -> None:
    """A port already taken is one line naming the listener and address, exit 2, no traceback."""
    publish_flat(tmp_path, "a", seed=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--bundles", str(tmp_path), "--host", "127.0.0.1", *extra]
        result = subprocess.run(
            [sys.executable, "-m", "slimrank.cli", *args, flag, str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    # grpc's own bind gives no errno; every other listener reports the socket's reason
    reason = (
        GRPC_REASON if flag == "--port" and "--workers" not in extra else "Address already in use"
    )
    line = f"slimrank: error: cannot listen for {what} on 127.0.0.1:{port}: {reason}\n"
    assert result.stderr.endswith(line), result.stderr
    assert "Traceback" not in result.stderr and "Errno" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "x.pem"], "go together"),
        (["--workers", "0"], "must be >= 1"),
        (["--reload-wait-ms", "-5"], "--reload-wait-ms -5: must be a finite number >= 0"),
        (["--max-wait-ms", "-1"], "--max-wait-ms -1: must be a finite number >= 0"),
        (["--burst-wait-ms", "-30"], "--burst-wait-ms -30: must be a finite number >= 0"),
        (["--freeze-watch-ms", "-10"], "--freeze-watch-ms -10: must be a finite number >= 0"),
        (["--freeze-watch-ms", "inf"], "--freeze-watch-ms inf: must be a finite number >= 0"),
        (["--max-wait-ms", "nan"], "--max-wait-ms nan: must be a finite number >= 0"),
        (["--max-inflight", "0"], "max_inflight"),
        (["--overload-fraction", "2"], "ServerConfig.overload_fraction=2.0: must be in [0, 1]"),
        (["--overload-fraction", "nan"], "ServerConfig.overload_fraction=nan: must be in"),
        (["--admin-token-file", "missing-token-file"], "missing-token-file"),
        # The sync engine's own rejections cannot be counted: it is not offered to operators.
        (["--engine", "sync"], "unrecognized arguments: --engine"),
    ],
)
def test_serve_rejects_bad_arguments(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "0", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gen_certs.sh's CA, server and client pairs, plus a passphrase-encrypted server key."""
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(SCRIPT), str(out)], check=True, capture_output=True)
    encrypt = ["openssl", "pkey", "-in", "server.key", "-aes128", "-passout", "pass:s3cret"]
    with (out / "encrypted.key").open("wb") as encrypted:
        subprocess.run(encrypt, cwd=out, check=True, stdout=encrypted)
    (out / "garbage.pem").write_text("not a certificate\n")
    return out


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("garbage.pem", "server.key", None), "--tls-cert garbage.pem with --tls-key server.key"),
        (("server.pem", "client.key", None), "KEY_VALUES_MISMATCH"),
        (("server.key", "server.pem", None), "--tls-cert server.key with --tls-key server.pem"),
        (("server.pem", "encrypted.key", None), "unencrypted private key"),
        (("server.pem", "server.key", "garbage.pem"), "--tls-client-ca garbage.pem: no PEM CA"),
        (("server.pem", "server.key", "server.key"), "--tls-client-ca server.key: no PEM CA"),
    ],
)
def test_serve_names_the_tls_file_it_cannot_use(
    certs: Path,
    files: tuple[str, str, str | None],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checked at start with OpenSSL, where grpc would fail at bind with "Failed to bind"."""
    monkeypatch.chdir(certs)
    cert, key, ca = files
    args = ["--tls-cert", cert, "--tls-key", key, *(["--tls-client-ca", ca] if ca else [])]
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "0", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "client.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "absent.pem"], "--tls-ca absent.pem: not a file"),
        (["--tls-ca", "garbage.pem"], "--tls-ca garbage.pem: no PEM CA certificate"),
        (["--tls-cert", "client.pem", "--tls-key", "server.key"], "KEY_VALUES_MISMATCH"),
        (["--tls-cert", "client.pem", "--tls-key", "encrypted.key"], "unencrypted private key"),
    ],
)
def test_query_names_the_tls_file_it_cannot_use(
    certs: Path,
    flags: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A usage error before any call, where grpc would answer every call UNAVAILABLE."""
    monkeypatch.chdir(certs)
    with pytest.raises(SystemExit) as exit_info:
        main(["query", "--target", "127.0.0.1:9", "--user", "u1", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mode", "token", "message"),
    [
        (0o644, TOKEN, "mode 0644, readable by others"),
        (0o620, TOKEN, "mode 0620"),
        (0o602, TOKEN, "mode 0602"),
        (0o600, "t0ken", "5 characters, fewer than 16"),
    ],
)
def test_serve_refuses_an_unsafe_admin_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int, token: str, message: str
) -> None:
    path = tmp_path / "token"
    path.write_text(f"{token}\n")
    path.chmod(mode)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "0", "--admin-token-file", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
