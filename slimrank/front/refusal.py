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
