"""The HTTP/JSON API beside gRPC, for frontends that cannot speak gRPC: transport-free core.

``POST /v1/recommend``, ``/v1/search`` and ``/v1/recommend:batch`` take the JSON form of the
proto request (protobuf's JSON mapping: ``user_id`` or ``userId``, enums by name) and answer
the JSON form of the proto response, field names as in the proto. Each call goes through the
gRPC server's own parts: the same :class:`Admission` (refused on arrival, before the body is
parsed, with 429 and ``Retry-After``), the same Recommender servicer and snapshot (so the same
validation: 400 naming the field), the same handler threads, and the same stage, in-flight and
shed metrics; calls are counted in their own series, ``slimrank_http_requests_total{route,
status}`` and ``slimrank_http_request_duration_seconds{route}``.

:class:`HttpApi.handle` maps (method, path, content type, body) to an :class:`HttpResponse`;
the web server in :mod:`slimrank.serving.http_server` only moves bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client import Counter, Histogram

from slimrank.serving.admission import Admission, Refusal
from slimrank.serving.aio_engine import HandlerAborted
from slimrank.serving.metrics import LATENCY_BUCKETS, ServingMetrics
from slimrank.serving.proto.slimrank.v1 import recommender_pb2

log = logging.getLogger(__name__)

JSON = "application/json"
# Seconds a shed caller is told to wait (the Retry-After header takes whole seconds).
RETRY_AFTER_S = 1

# gRPC status -> HTTP status, as Google's API gateways map them (google/rpc/code.proto).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

# "k: must be in [1, 100]" / "requests[3].k: ..." -> the field the message starts with; the
# JSON parser's own messages name the field in their text.
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
UTF8_BOM = b"\xef\xbb\xbf"
_PARSE_FIELD = re.compile(r'Failed to parse (\w+) field|has no field named "(\w+)"')
# protobuf's parser ends some messages with where it was: 'at RecommendRequest.filters[0].min.',
# or, for an unknown field, 'has no field named "kk" at "RecommendBatchRequest.requests[0]"'.
_PARSE_AT = re.compile(r' at "?\w+((?:\.\w+(?:\[\d+\])?)*)"?\.*(?:\n|$)')


class BodyTooLarge(Exception):
    """The web server's body reader passed the limit (a chunked body, whose length no header
    gave beforehand)."""


class BodyLost(Exception):
    """The caller went away before its whole body arrived: there is no one to answer."""


@dataclasses.dataclass(frozen=True)
class Route:
    """One POST endpoint: the servicer method it calls and its request message."""

    method: str  # the servicer's method name, e.g. "Recommend"
    request: type[Message]


ROUTES: dict[str, Route] = {
    "/v1/recommend": Route("Recommend", recommender_pb2.RecommendRequest),
    "/v1/search": Route("Search", recommender_pb2.SearchRequest),
    "/v1/recommend:batch": Route("RecommendBatch", recommender_pb2.RecommendBatchRequest),
}


@dataclasses.dataclass(frozen=True)
class HttpResponse:
    """What to send: status, extra headers and a JSON body."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def error_response(
    status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> HttpResponse:
    """A JSON error body: ``{"code", "message"}`` and ``field`` when the message names one."""
    payload: dict[str, Any] = {"code": code, "message": message}
    if code == "INVALID_ARGUMENT":
        match = _FIELD.match(message)
        parsed = _PARSE_FIELD.search(message)
        if match:
            payload["field"] = match.group(1)
        elif parsed:
            payload["field"] = _parsed_field(message, parsed)
    return HttpResponse(status, json.dumps(payload).encode(), headers)


def _parsed_field(message: str, parsed: re.Match[str]) -> str:
    """The path of the field a JSON parse error is about (``requests[3].k``) when the parser
    says where it was; else the outermost field it names."""
    at = _PARSE_AT.search(message)
    if at is None:
        return parsed.group(1) or parsed.group(2)
    path = at.group(1).lstrip(".")
    unknown = re.search(r'has no field named "(\w+)"', message)
    if unknown:
        return f"{path}.{unknown.group(1)}" if path else unknown.group(1)
    return path or parsed.group(1) or parsed.group(2)


class HttpContext:
    """The ``grpc.ServicerContext`` surface the servicers use, for a call that came over HTTP.

    ``abort`` records the code and details and raises; there is no deadline (HTTP has none to
    propagate), and the request headers stand in for the invocation metadata.
    """

    def __init__(self, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._headers = headers
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details
        raise HandlerAborted(details)

    def abort_with_status(self, status: grpc.Status) -> None:
        """As ``abort``; the status's trailing metadata (rich error details) is dropped."""
        self.abort(status.code, status.details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Any) -> None:
        """Trailers have no HTTP/1.1 equivalent here; dropped."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._headers

    def peer(self) -> str:
        return "http"

    def is_active(self) -> bool:
        return True


class HttpMetrics:
    """The HTTP calls' own series, beside the gRPC ones on the same registry."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.requests = Counter(
            "slimrank_http_requests",
            "HTTP/JSON calls answered, by route and HTTP status.",
            ["route", "status"],
            registry=metrics.registry,
        )
        self.request_duration = Histogram(
            "slimrank_http_request_duration_seconds",
            "Time from the HTTP call's admission to its answer.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=metrics.registry,
        )


def _content_type_is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == JSON or (mime.startswith("application/") and mime.endswith("+json"))


class HttpApi:
    """Answers HTTP/JSON calls with the gRPC server's servicer, admission and metrics.

    ``handler_pool`` runs the servicer (None: inline on the event loop); ``batch_pool``,
    when given, runs ``RecommendBatch`` instead, so that a batch does not hold the calls
    queued for the handler thread.
    """

    def __init__(
        self,
        servicer: Any,
        admission: Admission,
        metrics: ServingMetrics,
        handler_pool: futures.Executor | None,
        max_body_bytes: int,
        batch_pool: futures.Executor | None = None,
    ) -> None:
        self._servicer = servicer
        self._batch_pool = batch_pool
        self._admission = admission
        self._metrics = metrics
        self._http = HttpMetrics(metrics)
        self._pool = handler_pool
        self.max_body_bytes = max_body_bytes
        for path in ROUTES:
            for status in ("200", "400", "429"):
                self._http.requests.labels(path, status)

    def _count(self, route: str, response: HttpResponse, start: float) -> HttpResponse:
        self._http.requests.labels(route, str(response.status)).inc()
        self._http.request_duration.labels(route).observe(time.perf_counter() - start)
        return response

    async def handle(
        self,
        method: str,
        path: str,
        content_type: str | None,
        body: bytes | Callable[[], Any],
        headers: tuple[tuple[str, str], ...] = (),
    ) -> HttpResponse:
        """Answer one call. ``body`` is the bytes or an awaitable-returning reader of them,
        which may raise :class:`BodyTooLarge` (answered 413) or :class:`BodyLost` (raised).

        The body is read whole before admission, as gRPC has the whole message before its
        call is admitted: a caller that sends its headers and then stalls holds a
        connection, not one of the model's slots (a few such callers refused every HTTP
        call with 429 on an idle server).
        """
        start = time.perf_counter()
        route = ROUTES.get(path)
        if route is None:
            return self._count(
                "other", error_response(404, "NOT_FOUND", f"no such endpoint: {path}"), start
            )
        if method != "POST":
            response = error_response(
                405, "METHOD_NOT_ALLOWED", f"{path} takes POST", (("Allow", "POST"),)
            )
            return self._count(path, response, start)
        if not _content_type_is_json(content_type):
            message = f"Content-Type must be {JSON}, got {content_type or 'none'}"
            return self._count(path, error_response(415, "UNSUPPORTED_MEDIA_TYPE", message), start)
        try:
            raw = body if isinstance(body, bytes) else await body()
        except BodyTooLarge:
            raw = None
        if raw is None or len(raw) > self.max_body_bytes:
            message = f"request body is larger than {self.max_body_bytes} bytes"
            return self._count(path, error_response(413, "PAYLOAD_TOO_LARGE", message), start)
        ticket = self._admission.enter(limited=True)
        if isinstance(ticket, Refusal):
            self._metrics.refused(ticket)
            message = (
                "server busy: refused on arrival so that accepted calls stay fast; "
                "retry with backoff, preferably on another replica"
            )
            retry = (("Retry-After", str(RETRY_AFTER_S)),)
            return self._count(
                path, error_response(429, "RESOURCE_EXHAUSTED", message, retry), start
            )
        try:
            raw = raw.removeprefix(UTF8_BOM)  # RFC 8259 lets a parser ignore one
            if not raw.lstrip(b" \t\r\n").startswith(b"{"):
                # protobuf's parser reads a JSON array's items as field names ("field 1").
                message = (
                    f"body must be a JSON object: a {route.request.DESCRIPTOR.name} in "
                    "protobuf's JSON mapping"
                )
                return self._count(path, error_response(400, "INVALID_ARGUMENT", message), start)
            try:
                request = json_format.Parse(raw, route.request())
            except (json_format.ParseError, UnicodeDecodeError, ValueError) as error:
                message = f"body is not a valid {route.request.DESCRIPTOR.name}: {error}"
                return self._count(path, error_response(400, "INVALID_ARGUMENT", message), start)
            response = await self._run(route, request, HttpContext(headers), ticket, start)
            return self._count(path, response, start)
        finally:
            ticket.release()

    async def _run(
        self, route: Route, request: Message, context: HttpContext, ticket: Any, accepted: float
    ) -> HttpResponse:
        handler = getattr(self._servicer, route.method)
        observe = route.method != "RecommendBatch"  # a batch's time is not one call's

        def run() -> Message | None:
            start = time.perf_counter()
            self._metrics.stage_duration.labels("queue").observe(start - accepted)
            self._metrics.inflight.inc()
            try:
                return handler(request, context)
            except HandlerAborted:
                return None
            finally:
                self._metrics.inflight.dec()
                if observe:
                    self._admission.observe(time.perf_counter() - start)

        pool = self._pool
        if self._batch_pool is not None and route.method == "RecommendBatch":
            pool = self._batch_pool
        try:
            if pool is None:
                message = run()
            else:
                future = pool.submit(run)
                ticket.hold()  # the slot stays taken while the thread works, as for gRPC
                future.add_done_callback(ticket.release)
                message = await asyncio.shield(asyncio.wrap_future(future))
        except Exception:
            log.exception("HTTP %s failed", route.method)
            return error_response(500, "INTERNAL", "internal error; see the server log")
        code = context.code()
        if message is None or (code is not None and code != grpc.StatusCode.OK):
            code = code or grpc.StatusCode.UNKNOWN
            return error_response(HTTP_STATUS.get(code, 500), code.name, context.details())
        text = json_format.MessageToJson(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            indent=None,
        )
        return HttpResponse(200, text.encode())
