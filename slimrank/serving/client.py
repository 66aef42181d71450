"""A small synchronous client: one overall deadline per call, retries by gRPC's retry policy."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slimrank.search.filters import ItemFilter
from slimrank.serving.proto.slimrank.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)
from slimrank.serving.security import bearer

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Ranked:
    """Items best first with their scores, and the model version that ranked them."""

    item_ids: tuple[str, ...]
    scores: tuple[float, ...]
    model_version: str
    candidates: int
    user_source: str = ""  # KNOWN, RECENT or POPULAR for recommend; empty for search


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    """One user's Recommend request inside :meth:`SlimrankClient.recommend_batch`."""

    user_id: str
    k: int
    recent: Sequence[str] = ()
    exclude: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the server says about the model it serves."""

    version: str
    created: dt.datetime | None
    parent_teacher_version: str
    n_items: int
    dim: int
    metrics: dict[str, float]
    loaded_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class ReloadResult:
    """The outcome of a reload request."""

    version: str
    previous_version: str
    reloaded: bool
    message: str


def _datetime(message: Any, field: str) -> dt.datetime | None:
    if not message.HasField(field):
        return None
    return getattr(message, field).ToDatetime(tzinfo=dt.UTC)


def _ranked(response: Any, user_source: str = "") -> Ranked:
    return Ranked(
        item_ids=tuple(item.item_id for item in response.items),
        scores=tuple(item.score for item in response.items),
        model_version=response.model_version,
        candidates=response.candidates,
        user_source=user_source,
    )


RECOMMENDER_SERVICE = "slimrank.v1.Recommender"
ADMIN_SERVICE = "slimrank.v1.Admin"
HEALTH_SERVICE = "grpc.health.v1.Health"
MAX_ATTEMPTS = 5  # gRPC caps a retry policy's maxAttempts at 5


def service_config(retries: int, backoff: float, max_backoff: float = 1.0) -> str:
    """Return the gRPC service config (JSON) of the client's retry policy.

    Recommender and health calls are retried on UNAVAILABLE (server restarting, connection
    refused) and RESOURCE_EXHAUSTED (shed: the server asks for a retry, and its
    ``grpc-retry-pushback-ms`` sets the delay); Admin calls on UNAVAILABLE only. gRPC draws
    each delay at random up to ``backoff * 2**n`` (capped at ``max_backoff``): full jitter.
    ``retryThrottling`` stops retrying while most calls fail, so retries cannot pile onto
    an overloaded server. Any gRPC client (Go, Java, C++ ...) reads the same JSON.
    """
    attempts = min(retries + 1, MAX_ATTEMPTS)

    def policy(codes: list[str]) -> dict[str, Any]:
        return {
            "maxAttempts": attempts,
            "initialBackoff": f"{backoff:.3f}s",
            "maxBackoff": f"{max(max_backoff, backoff):.3f}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": codes,
        }

    if attempts < 2:
        return json.dumps({"methodConfig": []})
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": RECOMMENDER_SERVICE}, {"service": HEALTH_SERVICE}],
                    "retryPolicy": policy(["UNAVAILABLE", "RESOURCE_EXHAUSTED"]),
                },
                {"name": [{"service": ADMIN_SERVICE}], "retryPolicy": policy(["UNAVAILABLE"])},
            ],
            "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        }
    )


def _filters(filters: Sequence[ItemFilter]) -> list[recommender_pb2.ItemFilter]:
    return [
        recommender_pb2.ItemFilter(field=f.field, any_of=list(f.values), min=f.low, max=f.high)
        for f in filters
    ]


class SlimrankClient:
    """Talks to one slimrank server; use as a context manager or call ``close``.

    Every call has one overall deadline of ``timeout`` seconds that covers all its attempts.
    gRPC retries failed attempts itself (:func:`service_config`: up to ``retries`` more, at
    most 4, with jittered exponential backoff from ``backoff`` seconds) on UNAVAILABLE and,
    for Recommender calls, RESOURCE_EXHAUSTED; every other error is raised at once as
    ``grpc.RpcError``. ``tls`` (see ``security.channel_credentials``) opens a TLS channel;
    ``admin_token`` is sent as ``authorization: Bearer <token>`` on Admin calls only. A
    ``channel`` passed in is used as it is (its own options decide about retries).
    """

    def __init__(
        self,
        target: str,
        timeout: float = 1.0,
        retries: int = 2,
        backoff: float = 0.05,
        channel: grpc.Channel | None = None,
        tls: grpc.ChannelCredentials | None = None,
        admin_token: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"SlimrankClient.timeout={timeout!r}: must be > 0")
        if retries < 0:
            raise ValueError(f"SlimrankClient.retries={retries!r}: must be >= 0")
        if backoff <= 0:
            raise ValueError(f"SlimrankClient.backoff={backoff!r}: must be > 0")
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        if channel is None:
            options = [
                ("grpc.enable_retries", 1),
                ("grpc.service_config", service_config(retries, backoff)),
                # Reconnect to a restarted server within the retries' backoff (gRPC's
                # default waits 1 s, then up to 120 s, before it dials again).
                ("grpc.initial_reconnect_backoff_ms", max(1, round(backoff * 1000))),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ]
            channel = (
                grpc.insecure_channel(target, options)
                if tls is None
                else grpc.secure_channel(target, tls, options)
            )
        self._channel = channel
        self._admin_metadata = None if admin_token is None else bearer(admin_token)
        self._recommender = recommender_pb2_grpc.RecommenderStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _call(
        self,
        method: Callable[..., T],
        request: Any,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> T:
        """Call ``method`` with one deadline for all attempts (gRPC retries within it)."""
        return method(
            request, timeout=self.timeout if timeout is None else timeout, metadata=metadata
        )

    def recommend(
        self,
        user_id: str,
        k: int,
        recent: Sequence[str] = (),
        exclude: Sequence[str] = (),
        timeout: float | None = None,
        filters: Sequence[ItemFilter] = (),
    ) -> Ranked:
        """Return the top-``k`` items for a user (known, known by ``recent`` items, or new)."""
        request = recommender_pb2.RecommendRequest(
            user_id=user_id,
            recent_item_ids=list(recent),
            k=k,
            exclude_item_ids=list(exclude),
            filters=_filters(filters),
        )
        response = self._call(self._recommender.Recommend, request, timeout)
        source = recommender_pb2.UserSource.Name(response.user_source).removeprefix("USER_SOURCE_")
        return _ranked(response, source)

    def recommend_batch(
        self,
        requests: Sequence[BatchRequest],
        page_size: int = 64,
        timeout: float | None = None,
    ) -> list[Ranked]:
        """Return, for each request, what :meth:`recommend` returns for it, in order.

        The requests go ``page_size`` per ``RecommendBatch`` call (at most the server's
        ``max_batch``, 64 by default); each page gets its own deadline of ``timeout``.
        """
        if page_size < 1:
            raise ValueError(f"recommend_batch: page_size={page_size!r} must be >= 1")
        out: list[Ranked] = []
        for start in range(0, len(requests), page_size):
            page = recommender_pb2.RecommendBatchRequest(
                requests=[
                    recommender_pb2.RecommendRequest(
                        user_id=r.user_id,
                        recent_item_ids=list(r.recent),
                        k=r.k,
                        exclude_item_ids=list(r.exclude),
                    )
                    for r in requests[start : start + page_size]
                ]
            )
            response = self._call(self._recommender.RecommendBatch, page, timeout)
            for one in response.responses:
                name = recommender_pb2.UserSource.Name(one.user_source)
                out.append(_ranked(one, name.removeprefix("USER_SOURCE_")))
        return out

    def search(
        self,
        vector: Sequence[float],
        k: int,
        exclude: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Ranked:
        """Return the top-``k`` items for a query vector."""
        request = recommender_pb2.SearchRequest(
            query_vector=[float(x) for x in vector], k=k, exclude_item_ids=list(exclude)
        )
        return _ranked(self._call(self._recommender.Search, request, timeout))

    def search_text(
        self,
        text: str,
        k: int,
        user_id: str = "",
        recent: Sequence[str] = (),
        exclude: Sequence[str] = (),
        filters: Sequence[ItemFilter] = (),
        timeout: float | None = None,
    ) -> Ranked:
        """Return the top-``k`` items matching ``text``, ranked for the user if one is named."""
        request = recommender_pb2.SearchRequest(
            text=text,
            k=k,
            user_id=user_id,
            recent_item_ids=list(recent),
            exclude_item_ids=list(exclude),
            filters=_filters(filters),
        )
        response = self._call(self._recommender.Search, request, timeout)
        source = recommender_pb2.UserSource.Name(response.user_source).removeprefix("USER_SOURCE_")
        return _ranked(response, source)

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        """Return the served model's version, metadata and load time."""
        response = self._call(
            self._admin.GetModelInfo,
            admin_pb2.GetModelInfoRequest(),
            timeout,
            self._admin_metadata,
        )
        return ModelInfo(
            version=response.version,
            created=_datetime(response, "created"),
            parent_teacher_version=response.parent_teacher_version,
            n_items=response.n_items,
            dim=response.dim,
            metrics=dict(response.metrics),
            loaded_at=_datetime(response, "loaded_at"),
        )

    def reload(self, version: str | None = None, timeout: float | None = None) -> ReloadResult:
        """Ask the server to load ``version`` (None: the newest) and swap it in."""
        request = (
            admin_pb2.ReloadRequest()
            if version is None
            else admin_pb2.ReloadRequest(version=version)
        )
        response = self._call(self._admin.Reload, request, timeout, self._admin_metadata)
        return ReloadResult(
            version=response.version,
            previous_version=response.previous_version,
            reloaded=response.reloaded,
            message=response.message,
        )

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """Return the health status name of ``service`` ("" = the whole server), e.g. SERVING."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(self._health.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
