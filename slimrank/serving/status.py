"""Machine-readable error details: a ``google.rpc.Status`` in the ``grpc-status-details-bin``
trailer, built with grpcio-status (the format every gRPC language's client can decode).

- INVALID_ARGUMENT carries a ``google.rpc.BadRequest`` with one field violation naming the
  request field (``query_vector``, ``k``, ``version`` ...);
- RESOURCE_EXHAUSTED from shedding carries a ``google.rpc.RetryInfo`` with the delay to wait.
"""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

T = TypeVar("T")

# The trailer gRPC's own retry policy honours (the Python client's among them) for the delay.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def _status(code: grpc.StatusCode, message: str, *details: object) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return status


def bad_request(field: str, description: str) -> grpc.Status:
    """Return INVALID_ARGUMENT ``"<field>: <description>"`` with a BadRequest field violation."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
    detail = error_details_pb2.BadRequest(field_violations=[violation])
    status = _status(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}", detail)
    return rpc_status.to_status(status)


def retry_info(code: grpc.StatusCode, message: str, retry_after_s: float) -> grpc.Status:
    """Return ``code`` with a RetryInfo asking the caller to wait ``retry_after_s`` seconds."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(retry_after_s * 1e9))
    detail = error_details_pb2.RetryInfo(retry_delay=delay)
    return rpc_status.to_status(_status(code, message, detail))


def refusal_metadata(message: str, retry_after_s: float) -> tuple[tuple[str, str | bytes], ...]:
    """Return the trailers of a RESOURCE_EXHAUSTED refusal (without ``grpc-status`` and
    ``grpc-message``): a ``google.rpc.Status`` with a RetryInfo of ``retry_after_s``, for
    clients that read status details, and the pushback in milliseconds, for gRPC's retry
    policy. The server's refusals and ``slimrank front``'s carry the same."""
    status = retry_info(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_s)
    return (*status.trailing_metadata, (RETRY_PUSHBACK_KEY, str(round(retry_after_s * 1000))))


def _details(error: grpc.RpcError, kind: type[T]) -> list[T]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    out = []
    for detail in () if status is None else status.details:
        if detail.Is(kind.DESCRIPTOR):  # type: ignore[attr-defined]
            message = kind()
            detail.Unpack(message)
            out.append(message)
    return out


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """Return ``{field: description}`` of the BadRequest details an RPC error carries."""
    return {
        v.field: v.description
        for request in _details(error, error_details_pb2.BadRequest)
        for v in request.field_violations
    }


def retry_delay_s(error: grpc.RpcError) -> float | None:
    """Return the RetryInfo delay an RPC error carries, in seconds, or None."""
    infos = _details(error, error_details_pb2.RetryInfo)
    return infos[0].retry_delay.ToNanoseconds() / 1e9 if infos else None
