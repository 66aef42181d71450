"""The gRPC edge: requests in, snapshot calls, responses or status codes out.

Domain errors turn into status codes here and only here: a :class:`ValidationError` becomes
INVALID_ARGUMENT naming the field, a deadline too close to do the work DEADLINE_EXCEEDED, and
a reload that fails NOT_FOUND / FAILED_PRECONDITION / INTERNAL with the served model kept.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from slimrank.search.filters import ItemFilter
from slimrank.serving.config import ServerConfig
from slimrank.serving.metrics import ServingMetrics
from slimrank.serving.proto.slimrank.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)
from slimrank.serving.snapshot import (
    ModelSnapshot,
    SnapshotHolder,
    UserQuery,
    UserSource,
    top_k,
)
from slimrank.serving.status import bad_request
from slimrank.serving.swap import ReloadFn, one_line, reload_status, replace_snapshot
from slimrank.serving.text_search import TextSearchConfig, retrieve_allowed, search_text
from slimrank.serving.text_validation import check_filters, check_text, filters_from_proto
from slimrank.serving.validation import (
    ValidationError,
    check_ids,
    check_k,
    check_user_id,
    check_vector,
)

log = logging.getLogger(__name__)

Handler = Callable[[Any, Any, grpc.ServicerContext], Any]


class NonFiniteScores(ArithmeticError):
    """Retrieval or ranking gave a NaN or infinite score (the query overflows float32)."""


def _norm(vector: np.ndarray | None) -> float:
    return float("nan") if vector is None else float(np.linalg.norm(vector.astype(np.float64)))


def _abort_invalid(context: grpc.ServicerContext, error: ValidationError) -> NoReturn:
    context.abort_with_status(bad_request(error.field, error.message))


def _internal_errors(method: Handler) -> Handler:
    """Answer INTERNAL for unexpected exceptions, logged here rather than sent to the client.

    ``context.abort`` raises too, after setting the code; those pass through unchanged.
    """

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception:
            if context.code() is not None:
                raise
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    return wrapper


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    """Recommend and Search over the snapshot current when the call starts."""

    def __init__(
        self, holder: SnapshotHolder, config: ServerConfig, metrics: ServingMetrics
    ) -> None:
        self._holder = holder
        self._config = config
        self._metrics = metrics
        self._text_config = TextSearchConfig()

    def _require_time(self, context: grpc.ServicerContext, before: str) -> None:
        left = context.time_remaining()
        if left is not None and left < self._config.min_time_left_s:
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline reached before {before} ({left * 1000:.1f} ms left)",
            )

    def _retrieve_and_rank(
        self,
        context: grpc.ServicerContext,
        snapshot: ModelSnapshot,
        query: UserQuery,
        drop: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
    ) -> tuple[list[recommender_pb2.ScoredItem], int]:
        """Run the stages after resolve: retrieve (and exclude), features, score, top k.

        ``allowed``: the items the request's filters keep (None: all). Returns the items and
        the candidate count.
        """
        n = max(snapshot.n_candidates or self._config.n_candidates, k)
        # A huge query overflows float32 scores; that is checked below, not warned about.
        with np.errstate(over="ignore", invalid="ignore"):
            with self._metrics.stage("retrieve"):
                if allowed is None:
                    retrieved = snapshot.retrieve(query, n, drop)
                else:
                    retrieved = retrieve_allowed(snapshot, query, n, drop, allowed)
            self._metrics.candidates.observe(len(retrieved))
            self._require_time(context, "ranking")
            if query.vector is None:
                scores = retrieved.scores  # popularity
            else:
                with self._metrics.stage("features"):
                    features = snapshot.featurize(query, retrieved)  # (m, F)
                with self._metrics.stage("rank"):
                    scores = np.asarray(snapshot.score(features), dtype=np.float32).reshape(-1)
        if not (np.isfinite(scores).all() and np.isfinite(retrieved.scores).all()):
            raise NonFiniteScores(
                f"scores are not finite (query vector norm {_norm(query.vector):.3g})"
            )
        rows, best = top_k(retrieved.rows, scores, k)
        items = [
            recommender_pb2.ScoredItem(item_id=str(snapshot.item_ids[r]), score=float(s))
            for r, s in zip(rows, best, strict=True)
        ]
        return items, len(retrieved)

    def _check_user_request(
        self, request: recommender_pb2.RecommendRequest | recommender_pb2.SearchRequest
    ) -> tuple[int, str, tuple[str, ...], tuple[str, ...], tuple[ItemFilter, ...]]:
        """Return the checked ``k``, user id, recent and excluded ids and filters of a request
        that names a user (Recommend, text Search); raises :class:`ValidationError`."""
        cfg = self._config
        k = check_k(request.k, cfg.max_k)
        user_id = check_user_id(request.user_id, cfg.max_id_length)
        recent = check_ids(
            request.recent_item_ids, cfg.max_exclude, cfg.max_id_length, "recent_item_ids"
        )
        exclude = check_ids(
            request.exclude_item_ids, cfg.max_exclude, cfg.max_id_length, "exclude_item_ids"
        )
        return k, user_id, recent, exclude, filters_from_proto(request.filters)

    @_internal_errors
    def Recommend(
        self, request: recommender_pb2.RecommendRequest, context: grpc.ServicerContext
    ) -> recommender_pb2.RecommendResponse:
        try:
            k, user_id, recent, exclude, filters = self._check_user_request(request)
        except ValidationError as error:
            _abort_invalid(context, error)
        self._require_time(context, "retrieval")
        snapshot = self._holder.get()
        try:
            allowed = check_filters(snapshot.catalog, filters, snapshot.version)
        except ValidationError as error:
            _abort_invalid(context, error)
        query = snapshot.user_query(user_id, recent)
        drop = np.union1d(snapshot.item_rows(exclude + recent), snapshot.seen_rows(query.row))
        items, n_candidates = self._retrieve_and_rank(context, snapshot, query, drop, k, allowed)
        return recommender_pb2.RecommendResponse(
            items=items,
            model_version=snapshot.version,
            candidates=n_candidates,
            user_source=int(query.source),
        )

    @_internal_errors
    def Search(
        self, request: recommender_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> recommender_pb2.SearchResponse:
        cfg = self._config
        snapshot = self._holder.get()  # before validation: the vector must match its dimension
        if request.text or not request.query_vector:
            return self._search_text(request, context, snapshot)
        if request.user_id or request.recent_item_ids:
            field = "user_id" if request.user_id else "recent_item_ids"  # the one to drop
            _abort_invalid(
                context, ValidationError(field, "ranks a text search only, not a query_vector")
            )
        try:
            k = check_k(request.k, cfg.max_k)
            vector = check_vector(request.query_vector, snapshot.dim)
            exclude = check_ids(
                request.exclude_item_ids, cfg.max_exclude, cfg.max_id_length, "exclude_item_ids"
            )
            allowed = check_filters(
                snapshot.catalog, filters_from_proto(request.filters), snapshot.version
            )
        except ValidationError as error:
            _abort_invalid(context, error)
        self._require_time(context, "retrieval")
        query = UserQuery(UserSource.RECENT, -1, vector)
        drop = np.unique(snapshot.item_rows(exclude))
        try:
            items, n_candidates = self._retrieve_and_rank(
                context, snapshot, query, drop, k, allowed
            )
        except NonFiniteScores as error:  # the model gives finite scores to sane vectors
            _abort_invalid(context, ValidationError("query_vector", f"too large: {error}"))
        return recommender_pb2.SearchResponse(
            items=items, model_version=snapshot.version, candidates=n_candidates
        )

    def _search_text(
        self,
        request: recommender_pb2.SearchRequest,
        context: grpc.ServicerContext,
        snapshot: ModelSnapshot,
    ) -> recommender_pb2.SearchResponse:
        """A text search: validate, resolve the user, match, filter, order (text_search)."""
        try:
            if request.query_vector:
                raise ValidationError("text", "send text or query_vector, not both")
            if not request.text:
                raise ValidationError("text", "empty: send the words to search for")
            text = check_text(request.text)
            k, user_id, recent, exclude, filters = self._check_user_request(request)
            if snapshot.catalog is None:
                raise ValidationError("text", f"model {snapshot.version} has no text index")
            allowed = check_filters(snapshot.catalog, filters, snapshot.version)
        except ValidationError as error:
            _abort_invalid(context, error)
        self._require_time(context, "retrieval")
        query = snapshot.user_query(user_id, recent)
        drop = np.unique(snapshot.item_rows(exclude))
        with self._metrics.stage("text_search"):
            rows, scores, n_candidates = search_text(
                snapshot, query, text, k, self._text_config, allowed, drop
            )
        self._metrics.candidates.observe(n_candidates)
        items = [
            recommender_pb2.ScoredItem(item_id=str(snapshot.item_ids[r]), score=float(s))
            for r, s in zip(rows, scores, strict=True)
        ]
        return recommender_pb2.SearchResponse(
            items=items,
            model_version=snapshot.version,
            candidates=n_candidates,
            user_source=int(query.source),
        )


def _timestamp(value: object) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)  # type: ignore[arg-type]
    return stamp


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Model info and reload; reloads are serialized and swap only a warmed-up snapshot."""

    def __init__(
        self,
        holder: SnapshotHolder,
        metrics: ServingMetrics,
        reload_fn: ReloadFn | None = None,
        reload_lock: threading.Lock | None = None,
    ) -> None:
        self._holder = holder
        self._metrics = metrics
        self._reload_fn = reload_fn
        # Shared with a bundle watcher, if any, so that reloads never interleave.
        self._reload_lock = reload_lock or threading.Lock()

    @_internal_errors
    def GetModelInfo(
        self, request: admin_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetModelInfoResponse:
        served = self._holder.served()
        snapshot, meta = served.snapshot, served.snapshot.metadata
        return admin_pb2.GetModelInfoResponse(
            version=snapshot.version,
            created=_timestamp(meta.created),
            parent_teacher_version=meta.parent_teacher_version,
            n_items=snapshot.n_items,
            dim=snapshot.dim,
            metrics={str(name): float(value) for name, value in meta.metrics.items()},
            loaded_at=_timestamp(served.loaded_at),
        )

    @_internal_errors
    def Reload(
        self, request: admin_pb2.ReloadRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ReloadResponse:
        reload_fn = self._reload_fn
        if reload_fn is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server has no bundle source")
        version = request.version if request.HasField("version") else None
        resolve = getattr(reload_fn, "resolve", None)
        done = replace_snapshot(
            self._holder,
            self._reload_lock,
            lambda: reload_fn(version),
            self._metrics,
            version,
            skip=lambda served: resolve is not None and resolve(version) == served,
        )
        if done.error is not None:
            name = "the newest bundle" if version is None else repr(version)
            context.abort(
                reload_status(done.error),
                f"reload of {name} failed, still serving {done.previous}: {one_line(done.error)}",
            )
        if done.version is None:
            return admin_pb2.ReloadResponse(
                version=done.previous,
                previous_version=done.previous,
                reloaded=False,
                message=f"already serving {done.previous}"
                + ("" if done.loaded else "; not loaded again"),
            )
        return admin_pb2.ReloadResponse(
            version=done.version,
            previous_version=done.previous,
            reloaded=True,
            message=f"swapped {done.previous} -> {done.version}",
        )
