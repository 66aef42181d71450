"""The deploy files' secure defaults: mutual TLS, an admin token, loopback ports, a policy.

No container engine or cluster runs here, so the files are parsed and checked; the server's
command line from the Dockerfile then runs for real, on the files deploy/make_secrets.sh
makes, and the image's health check probes it as the Dockerfile and Kubernetes do.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from test_deploy_files import (
    DEPLOY,
    GRPC_PORT,
    METRICS_PORT,
    compose,
    exec_form,
    final_stage,
    flag,
    healthcheck_command,
    k8s,
    pod_spec,
    slimrank_commands,
)

from slimrank.bundle import publish
from slimrank.serving.client import SlimrankClient
from slimrank.serving.loader import random_flat_bundle
from slimrank.serving.security import channel_credentials

SECRETS_IN_CONTAINER = "/etc/slimrank"
TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca")
PROBE_TLS_FLAGS = ("--tls-ca", "--tls-cert", "--tls-key")


def server_commands() -> dict[str, list[str]]:
    return {w: a for w, a in slimrank_commands().items() if a[0] == "serve"}


def test_compose_publishes_every_port_on_loopback_only():
    published = 0
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):  # the long syntax
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)
                assert str(port).count(":") == 2, (name, port)  # host ip:host port:container
    assert published >= 3  # gRPC, Prometheus, Grafana
    assert "9100" not in str(compose()["services"]["slimrank"].get("ports"))


def test_grafana_needs_a_login_whose_password_is_not_in_the_file():
    grafana = compose()["services"]["grafana"]
    env = {k: str(v) for k, v in grafana["environment"].items()}
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED", "false") == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env  # a literal password
    password_file = env["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    (secret,) = grafana["secrets"]
    assert password_file == f"/run/secrets/{secret}"
    assert compose()["secrets"][secret]["file"].startswith("./secrets/")


@pytest.mark.parametrize("where", sorted(server_commands()))
def test_every_server_command_line_asks_mutual_tls_and_an_admin_token(where):
    argv = server_commands()[where]
    for name in (*TLS_FLAGS, "--admin-token-file"):
        assert flag(argv, name).startswith(SECRETS_IN_CONTAINER + "/"), (where, name)
    assert "--admin-insecure" not in argv


def test_secret_files_lie_in_read_only_secret_mounts():
    """Every file a server command line or probe names is in a mount of the secrets."""
    (container,) = pod_spec(k8s("Deployment"))["containers"]
    volumes = {v["name"]: v for v in pod_spec(k8s("Deployment"))["volumes"]}
    k8s_mounts = {
        m["mountPath"]: m
        for m in container["volumeMounts"]
        if "secret" in volumes[m["name"]] and m.get("readOnly")
    }
    compose_mounts = {
        v.split(":")[1]: v
        for v in compose()["services"]["slimrank"]["volumes"]
        if v.startswith("./secrets/") and v.endswith(":ro")
    }
    probes = [container[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe")]
    files = {
        "k8s": [flag(server_commands()["k8s Deployment slimrank"], f) for f in TLS_FLAGS]
        + [flag(p, f) for p in probes for f in PROBE_TLS_FLAGS],
        "compose": [flag(server_commands()["compose slimrank"], f) for f in TLS_FLAGS]
        + [flag(healthcheck_command(), f) for f in PROBE_TLS_FLAGS],
    }
    for where, mounts in (("k8s", k8s_mounts), ("compose", compose_mounts)):
        for path in files[where]:
            assert str(Path(path).parent) in mounts, (where, path)
    for secret in ("slimrank-tls", "slimrank-admin-token"):
        (volume,) = [v for v in volumes.values() if v.get("secret", {}).get("secretName") == secret]
        assert volume["secret"]["defaultMode"] & 0o007 == 0, secret  # not world-readable


def test_network_policy_admits_only_frontends_and_prometheus():
    policy = k8s("NetworkPolicy")
    deployment = k8s("Deployment")
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods.items()
    assert "Ingress" in policy["spec"]["policyTypes"]
    allowed: dict[str, list[dict]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        assert rule.get("ports"), "a rule without `ports` admits every port"
        for source in rule["from"]:
            assert "ipBlock" not in source, source
            # Both selectors in one entry: those pods in those namespaces (AND), never all
            # pods of a namespace nor a name-alike pod in any namespace.
            assert source["namespaceSelector"]["matchLabels"], source
            assert source["podSelector"]["matchLabels"], source
        for port in rule["ports"]:
            allowed.setdefault(port["port"], []).extend(rule["from"])
    (container,) = pod_spec(deployment)["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(allowed) == {"grpc", "metrics"} == set(named)
    assert (named["grpc"], named["metrics"]) == (GRPC_PORT, METRICS_PORT)
    (prometheus,) = allowed["metrics"]
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert prometheus not in allowed["grpc"]


# The real server with the deploy defaults


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("secrets")
    subprocess.run([str(DEPLOY / "make_secrets.sh"), str(out)], check=True, timeout=60)
    return out


def test_make_secrets_writes_private_files(secrets: Path) -> None:
    made = sorted(str(p.relative_to(secrets)) for p in secrets.rglob("*") if p.is_file())
    assert made == [
        "admin/token",
        "grafana-admin-password",
        "tls/ca.crt",
        "tls/client.crt",
        "tls/client.key",
        "tls/probe.crt",
        "tls/probe.key",
        "tls/tls.crt",
        "tls/tls.key",
    ]
    for path in secrets.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o077 == 0, path
    assert len((secrets / "admin" / "token").read_text().strip()) >= 32


def test_the_image_command_serves_mutual_tls_and_its_probe_passes(
    secrets: Path, tmp_path: Path
) -> None:
    bundles = tmp_path / "bundles"
    publish(bundles, random_flat_bundle("a", seed=1))
    local = {SECRETS_IN_CONTAINER: str(secrets), "/bundles": str(bundles)}

    def here(argv: list[str]) -> list[str]:
        return [re.sub(r"^(/etc/slimrank|/bundles)", lambda m: local[m[1]], a) for a in argv]

    argv = here(exec_form(final_stage(), "CMD"))
    for name, value in (("--port", "0"), ("--metrics-port", "0"), ("--host", "127.0.0.1")):
        argv[argv.index(name) + 1] = value
    argv[argv.index("--metrics-host") + 1] = "127.0.0.1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimrank.cli", *argv, "--poll-interval", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"serving on (\S+):(\d+) ", line)
        assert match, line
        target = f"127.0.0.1:{match[2]}"
        probe = here(healthcheck_command())
        assert probe[1] == "/opt/slimrank/healthcheck.py"  # the image's copy of this script
        probe[1] = str(DEPLOY / "healthcheck.py")
        probe[probe.index("--target") + 1] = target
        ran = subprocess.run(
            [sys.executable, *probe[1:]], capture_output=True, text=True, timeout=30
        )
        assert ran.returncode == 0 and "SERVING" in ran.stdout, ran.stdout + ran.stderr
        # Without a client certificate, or in plaintext, nothing is answered.
        no_cert = [a for a in probe[1:] if a not in ("--tls-cert", "--tls-key")]
        no_cert = [a for a in no_cert if not a.endswith(("probe.crt", "probe.key"))]
        plain = [*probe[1:4], "--service", "slimrank.v1.Recommender", "--timeout", "2"]
        for attempt in (no_cert, plain):
            failed = subprocess.run(
                [sys.executable, *attempt], capture_output=True, text=True, timeout=30
            )
            assert failed.returncode == 1, failed.stdout
        tls = secrets / "tls"
        mtls = channel_credentials(tls / "ca.crt", tls / "client.crt", tls / "client.key")
        with SlimrankClient(f"localhost:{match[2]}", tls=mtls, timeout=5.0) as client:
            assert len(client.recommend("u1", 3).item_ids) == 3
            with pytest.raises(grpc.RpcError) as info:
                client.model_info()  # Admin without the token
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (secrets / "admin" / "token").read_text().strip()
        with SlimrankClient(
            f"localhost:{match[2]}", tls=mtls, timeout=5.0, admin_token=token
        ) as admin:
            assert admin.model_info().version.startswith("v")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
