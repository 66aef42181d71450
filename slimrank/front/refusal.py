"""What the front answers when it refuses a call: the server's own refusal, as headers."""

from __future__ import annotations

import base64

import grpc

from slimrank.front.config import FrontConfig
from slimrank.serving.status import refusal_metadata

RATE_MESSAGE = (
    "front busy: over its rate limit, refused so that accepted calls stay fast; "
    "retry with backoff, preferably on another replica"
)
QUEUE_MESSAGE = (
    "front busy: every place at the server is taken and the front's queue is full or the "
    "wait in it ran out, refused so that accepted calls stay fast; retry with backoff, "
    "preferably on another replica"
)


def too_large_message(config: FrontConfig) -> str:
    """The ``grpc-message`` of the front's answer to a request over its size limit."""
    return (
        f"request larger than the front's limit of {config.max_message_bytes} bytes "
        "(slimrank front --max-message-bytes, as the server's); not retried: send less, "
        "e.g. fewer recent items or a shorter batch"
    )


def too_large_headers(config: FrontConfig) -> list[tuple[str, str]]:
    """Return the gRPC status headers of the front's answer to a request over its size
    limit: ``grpc-status`` 8 (RESOURCE_EXHAUSTED, the code the server gives a message over
    its own limit), the message, and a negative ``grpc-retry-pushback-ms``, which tells a
    client's gRPC retry policy not to retry (gRFC A6): the same request would fail again."""
    code = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    return [
        ("grpc-status", code),
        ("grpc-message", too_large_message(config)),
        ("grpc-retry-pushback-ms", "-1"),
    ]


def refusal_message(config: FrontConfig) -> str:
    """The ``grpc-message`` of the front's refusal: which limit refused the call."""
    return RATE_MESSAGE if config.rate is not None else QUEUE_MESSAGE


def refusal_headers(config: FrontConfig) -> list[tuple[str, str]]:
    """Return the gRPC status headers of the front's refusal, as the server's refusal has
    them (:func:`slimrank.serving.status.refusal_metadata`): ``grpc-status`` 8, the message,
    the ``google.rpc.Status`` with RetryInfo (base64, unpadded, as gRPC writes binary
    headers) and the retry pushback."""
    message = refusal_message(config)
    headers = [
        ("grpc-status", str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])),
        ("grpc-message", message),
    ]
    for key, value in refusal_metadata(message, config.retry_after_s):
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode().rstrip("=")
        headers.append((key, value))
    return headers
