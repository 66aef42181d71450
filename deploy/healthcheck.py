"""gRPC health probe for the container HEALTHCHECK: exit 0 if the service is SERVING, else 1.

    python healthcheck.py [--target 127.0.0.1:50051] [--service slimrank.v1.Recommender]
                          [--tls-ca CA.crt [--tls-cert PROBE.crt --tls-key PROBE.key]]

Uses the standard ``grpc.health.v1.Health/Check`` call (grpcio-health-checking, a dependency
of slimrank), so the image needs no grpc_health_probe binary. With ``--tls-ca`` the probe
speaks TLS, verifying the server against that CA; ``--tls-cert``/``--tls-key`` present a
client certificate, for servers that require mutual TLS. The image's HEALTHCHECK and the
Kubernetes probes (``exec``: kubelet's native gRPC probe cannot speak TLS) both run it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel(
    target: str,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A plaintext channel, or a TLS one trusting ``ca`` (with a client certificate)."""
    if ca is None:
        return grpc.insecure_channel(target)

    def read(path: str | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    options = [] if server_name is None else [("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(target, credentials, options)


def check(target: str, service: str, timeout: float, **tls: str | None) -> tuple[bool, str]:
    """Return (serving, what was seen) for ``service`` at ``target``; ``tls``: :func:`channel`."""
    with channel(target, **tls) as channel_:
        try:
            response = health_pb2_grpc.HealthStub(channel_).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gRPC health probe")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--service", default="slimrank.v1.Recommender")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    parser.add_argument("--tls-ca", help="CA (PEM) the server certificate must chain to")
    parser.add_argument("--tls-cert", help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", help="client private key (PEM)")
    parser.add_argument("--tls-server-name", help="name to verify instead of the target's host")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        parser.error("--tls-cert needs --tls-ca")
    tls = {
        "ca": args.tls_ca,
        "cert": args.tls_cert,
        "key": args.tls_key,
        "server_name": args.tls_server_name,
    }
    serving, seen = check(args.target, args.service, args.timeout, **tls)
    print(f"{args.target} {args.service or '(server)'}: {seen}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
