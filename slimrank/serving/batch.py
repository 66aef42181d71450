"""``RecommendBatch``: many users in one call, each answered exactly as ``Recommend`` answers.

The batch runs the Recommend handler once per request, in order, over the snapshot current
when the call starts (a reload mid-batch does not mix two models in one answer). An invalid
request fails the whole call with INVALID_ARGUMENT naming it, e.g. ``requests[3].k: ...``.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from slimrank.serving.proto.slimrank.v1 import recommender_pb2
from slimrank.serving.servicer import RecommenderServicer, _internal_errors
from slimrank.serving.snapshot import SnapshotHolder
from slimrank.serving.status import bad_request

# Field name of the requests in RecommendBatchRequest, for error messages.
REQUESTS_FIELD = "requests"


class _FieldPrefixContext:
    """A servicer context whose INVALID_ARGUMENT details name the request in the batch."""

    def __init__(self, context: Any, prefix: str) -> None:
        self._context = context
        self._prefix = prefix

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            details = f"{self._prefix}.{details}"
        self._context.abort(code, details)
        raise AssertionError("abort returned")  # every context's abort raises

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        if status.code == grpc.StatusCode.INVALID_ARGUMENT:
            # "field: description" -> a BadRequest naming requests[i].field, message and detail.
            field, _, description = status.details.partition(": ")
            status = bad_request(f"{self._prefix}.{field}", description)
        self._context.abort_with_status(status)
        raise AssertionError("abort_with_status returned")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _PinnedHolder:
    """Holds one snapshot for the length of a batch (``get`` / ``served`` as SnapshotHolder)."""

    def __init__(self, holder: SnapshotHolder) -> None:
        self._served = holder.served()

    def get(self) -> Any:
        return self._served.snapshot

    def served(self) -> Any:
        return self._served


class BatchRecommenderServicer(RecommenderServicer):
    """The Recommender servicer with ``RecommendBatch``, bounded by ``config.max_batch``."""

    @_internal_errors
    def RecommendBatch(
        self, request: recommender_pb2.RecommendBatchRequest, context: grpc.ServicerContext
    ) -> recommender_pb2.RecommendBatchResponse:
        n, limit = len(request.requests), self._config.max_batch
        if not 1 <= n <= limit:
            context.abort_with_status(
                bad_request(
                    REQUESTS_FIELD, f"must hold 1 to {limit} requests (page longer lists), got {n}"
                )
            )
        pinned = RecommenderServicer(_PinnedHolder(self._holder), self._config, self._metrics)  # type: ignore[arg-type]
        responses = [
            pinned.Recommend(one, _FieldPrefixContext(context, f"{REQUESTS_FIELD}[{i}]"))
            for i, one in enumerate(request.requests)
        ]
        return recommender_pb2.RecommendBatchResponse(responses=responses)
