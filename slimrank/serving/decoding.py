"""Request bodies that do not parse: answered INVALID_ARGUMENT with one log line.

grpc calls a handler's ``request_deserializer`` itself; when it raises (a malformed protobuf
body, invalid UTF-8 in a string field) grpc answers INTERNAL or UNKNOWN and logs a traceback
at ERROR, which any client could repeat to flood the log. :func:`lenient` wraps the
deserializer so that a body that does not parse becomes a :class:`Malformed` request, and the
engines answer that with :func:`malformed_message` before any handler runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Deserializer = Callable[[bytes], Any]


class Malformed:
    """A request body the method's message type could not parse."""

    __slots__ = ("error", "size")

    def __init__(self, error: Exception, size: int) -> None:
        self.error = error
        self.size = size


def lenient(deserializer: Deserializer | None) -> Deserializer | None:
    """Return ``deserializer`` returning :class:`Malformed` instead of raising."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError and anything else a parser raises
            return Malformed(error, len(data))

    return deserialize


def malformed_message(method: str, request: Malformed, peer: str) -> str:
    """Log one WARNING line for the malformed request; return the message for the caller."""
    reason = str(request.error) or type(request.error).__name__
    log.warning(
        "%s from %s: malformed request body (%d bytes): %r", method, peer, request.size, reason
    )
    return f"request body: not a valid request message for {method} ({reason})"
