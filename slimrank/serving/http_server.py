"""The HTTP/JSON endpoint's web server: aiohttp on the gRPC server's event loop.

aiohttp was measured against a small asyncio server on h11 in front of the same
:class:`~slimrank.serving.http_api.HttpApi` (``bench/http_stack.py``,
``bench/results/http_stack.md``): on the ml-100k bundle its median p50 / p99 over three
rounds were lower (3.6 / 18 ms against 4.8 / 27 ms at 50 calls/s), with the echo servicer the
two were equal within the shared machine's noise (0.6-0.75 ms of server CPU per call each).
It also brings what h11 leaves to the caller: keep-alive, chunked bodies, the body limit and
connection handling. Both run on grpc.aio's loop, so admission and handler threads are shared
as they are. This module only moves bytes; ``HttpApi`` decides every answer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from slimrank.serving.http_api import BodyLost, BodyTooLarge, HttpApi, error_response

log = logging.getLogger(__name__)


@dataclasses.dataclass
class HttpFront:
    """A started HTTP endpoint; ``close`` (a coroutine, on the loop) stops it."""

    runner: web.AppRunner
    port: int

    async def close(self) -> None:
        """Stop taking connections and finish the calls in progress."""
        await self.runner.cleanup()


def _handler(api: HttpApi) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > api.max_body_bytes:
            too_large = error_response(
                413, "PAYLOAD_TOO_LARGE", f"request body is larger than {api.max_body_bytes} bytes"
            )
            return web.Response(
                status=too_large.status, body=too_large.body, content_type="application/json"
            )

        async def read() -> bytes:
            try:
                return await request.read()
            except web.HTTPRequestEntityTooLarge as err:  # aiohttp's own is text/plain
                raise BodyTooLarge from err
            except ConnectionResetError as err:
                raise BodyLost from err

        try:
            response = await api.handle(
                request.method,
                request.path,
                request.headers.get("Content-Type"),
                read,
                tuple(request.headers.items()),
            )
        except BodyLost:
            log.debug("HTTP caller %s went away before its body arrived", request.remote)
            raise web.HTTPBadRequest from None  # never sent: the connection is gone
        return web.Response(
            status=response.status,
            body=response.body,
            headers=dict(response.headers),
            content_type="application/json",
        )

    return handle


async def start_http(
    api: HttpApi, host: str, port: int, reuse_port: bool = False, grace_s: float = 5.0
) -> HttpFront:
    """Serve ``api`` on ``http://host:port`` (port 0 picks one); call on the event loop.

    On close, calls in progress get ``grace_s`` seconds to finish.
    """
    # client_max_size: aiohttp answers 413 itself for a chunked body beyond it.
    app = web.Application(client_max_size=api.max_body_bytes)
    app.router.add_route("*", "/{path:.*}", _handler(api))
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=grace_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    await site.start()
    server = site._server  # the asyncio server: the only way to the bound port
    bound = port if server is None else int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    return HttpFront(runner, bound)
