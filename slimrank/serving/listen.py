"""A port the server cannot listen on, as one error that names it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from slimrank.errors import SlimrankError

# grpc says only "Failed to bind"; these are the causes an operator can act on.
GRPC_REASON = "in use, or not an address of this host"


class ListenError(SlimrankError):
    """A listener (gRPC, HTTP/JSON or /metrics) could not bind its address."""


@contextlib.contextmanager
def listening(what: str, host: str, port: int | None) -> Iterator[None]:
    """Raise :class:`ListenError` naming ``what`` and ``host:port`` if the body cannot bind.

    Catches ``OSError`` (sockets, asyncio, the metrics server) and grpc's ``RuntimeError``
    from ``add_insecure_port`` / ``add_secure_port``.
    """
    try:
        yield
    except (OSError, RuntimeError) as err:
        reason = GRPC_REASON
        if isinstance(err, OSError) and err.errno:  # asyncio's strerror repeats the address
            reason = os.strerror(err.errno)
        raise ListenError(f"cannot listen for {what} on {host}:{port}: {reason}") from err
