"""gRPC health probe for the container HEALTHCHECK: exit 0 if the service is SERVING, else 1.

    python healthcheck.py [--target 127.0.0.1:50051] [--service slimrank.v1.Recommender]

Uses the standard ``grpc.health.v1.Health/Check`` call (grpcio-health-checking, a dependency
of slimrank), so the image needs no grpc_health_probe binary. Kubernetes does not use this:
its probes call the same service natively (``grpc:`` probes in k8s/deployment.yaml).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str, timeout: float) -> tuple[bool, str]:
    """Return (serving, what was seen) for ``service`` at ``target``."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
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
    args = parser.parse_args(argv)
    serving, seen = check(args.target, args.service, args.timeout)
    print(f"{args.target} {args.service or '(server)'}: {seen}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
