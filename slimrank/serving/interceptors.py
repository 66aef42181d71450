"""The sync engine's interceptors: per-call metrics and the bound on concurrent model calls.

(``engine="sync"``, kept for comparison; the default grpc.aio engine admits calls and records
the same metrics in :mod:`slimrank.serving.aio_engine`.)

grpc's sync server runs ``intercept_service`` on its polling thread and the returned handler
on a worker thread, so a wrapper that notes the time in the first and reads it in the second
measures how long the call waited for a worker (the ``queue`` stage). Only unary-unary
handlers are wrapped; streaming ones (the health ``Watch``) pass through untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from slimrank.serving.admission import Refusal
from slimrank.serving.decoding import Malformed, lenient, malformed_message
from slimrank.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _wrap_unary(handler: grpc.RpcMethodHandler, behavior: Behavior) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=lenient(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts calls by method and status code, times them, and tracks calls in flight.

    Put it first in the interceptor list so that it also sees the calls that later
    interceptors reject. ``queue_prefix`` selects the methods whose worker wait is recorded
    as the ``queue`` stage (the model calls, not health probes).
    """

    def __init__(self, metrics: ServingMetrics, queue_prefix: str = "/slimrank.v1.") -> None:
        self._metrics = metrics
        self._queue_prefix = queue_prefix

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        accepted = time.perf_counter()
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        inner = handler.unary_unary
        metrics = self._metrics
        record_queue = method.startswith(self._queue_prefix)

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            if record_queue:
                metrics.stage_duration.labels("queue").observe(start - accepted)
            metrics.inflight.inc()
            code = grpc.StatusCode.UNKNOWN
            try:
                if isinstance(request, Malformed):
                    message = malformed_message(method, request, context.peer())
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                response = inner(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except Exception:
                # context.abort raises after setting the code; anything else is a bug (UNKNOWN).
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                metrics.inflight.dec()
                metrics.request_duration.labels(method).observe(time.perf_counter() - start)
                metrics.requests.labels(method, code.name).inc()

        return _wrap_unary(handler, behavior)


class ConcurrencyLimitInterceptor(grpc.ServerInterceptor):
    """Sheds calls beyond ``limit`` running ones with RESOURCE_EXHAUSTED, at once, and counts them.

    grpc's own ``maximum_concurrent_rpcs`` also rejects at once, but before any interceptor
    runs, so those rejections cannot be counted; this bound sits below it. The slot is taken
    on the worker thread (not the polling thread) so a call cancelled before it reaches a
    worker never holds one. Only methods starting with ``prefix`` are bounded, so health
    checks and admin calls still get through under load.
    """

    def __init__(
        self, limit: int, metrics: ServingMetrics, prefix: str = "/slimrank.v1.Recommender/"
    ) -> None:
        if limit < 1:
            raise ValueError(f"ConcurrencyLimitInterceptor.limit={limit!r}: must be >= 1")
        self._limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._metrics = metrics
        self._prefix = prefix

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if (
            handler is None
            or handler.unary_unary is None
            or not handler_call_details.method.startswith(self._prefix)
        ):
            return handler
        inner = handler.unary_unary

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            if not self._slots.acquire(blocking=False):
                self._metrics.refused(Refusal.IN_PROGRESS)
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server busy: {self._limit} calls in flight; retry with backoff",
                )
            try:
                return inner(request, context)
            finally:
                self._slots.release()

        return _wrap_unary(handler, behavior)
