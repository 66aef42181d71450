"""The served model: an immutable :class:`ModelSnapshot` per bundle version and its holder.

A request runs through typed stages, each built once per snapshot and each timed by the
servicer: resolve the user (:meth:`ModelSnapshot.user_query`) -> retrieve and exclude
(:meth:`ModelSnapshot.retrieve`, rows and the index's scores, which the features reuse) ->
features (:attr:`ModelSnapshot.featurize`) -> score (:attr:`ModelSnapshot.score`) -> top k
(:func:`top_k`).

The stages are plain callables, so the production pieces (a FAISS IVF-PQ index, the feature
tables and the ONNX int8 scorer) and the exact reference built here by
:func:`build_flat_snapshot` (``IndexFlatIP`` and a linear dot-product + popularity ranker)
are interchangeable.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import faiss
import numpy as np

from slimrank.ranking.histories import Histories
from slimrank.ranking.neighbors import MARKS as _MARKS
from slimrank.search.catalog import Catalog
from slimrank.serving.admission import LoadActivity
from slimrank.serving.id_index import IdIndex

log = logging.getLogger(__name__)

# (B, d) float32 queries, n -> (B, n) scores and (B, n) int64 item rows, -1 where none.
Retriever = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
# (F,) features of a request's candidates: the query, the retrieved rows and scores -> (m, F).
Featurizer = Callable[["UserQuery", "Retrieved"], np.ndarray]
# (m, F) features -> (m,) scores, higher is better.
Scorer = Callable[[np.ndarray], np.ndarray]
# (h,) distinct item rows a user not in the bundle sent, oldest first -> (d,) float32 vector.
HistoryEncoder = Callable[[np.ndarray], np.ndarray]


class UserSource(enum.IntEnum):
    """Where a request's user vector came from (values match the proto enum)."""

    KNOWN = 1
    RECENT = 2
    POPULAR = 3


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """What a bundle's manifest says about the model."""

    created: dt.datetime | None = None
    parent_teacher_version: str = ""
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class UserQuery:
    """The user side of one request: its source, table row (-1 if none), vector and history."""

    source: UserSource
    row: int
    vector: np.ndarray | None  # (d,) float32, None for the popularity fallback
    # The distinct item rows a RECENT user sent, newest first (one row); None otherwise.
    history: Histories | None = None


@dataclasses.dataclass(frozen=True)
class Retrieved:
    """A request's candidates after exclusion: item rows, best first, and their scores."""

    rows: np.ndarray  # (m,) int64
    scores: np.ndarray  # (m,) float32: the index's (or popularity for the fallback)

    def __len__(self) -> int:
        return len(self.rows)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelSnapshot:
    """One bundle version's index, tables and ranker; never mutated once built."""

    version: str
    item_ids: np.ndarray  # (n_items,) str
    item_vectors: np.ndarray  # (n_items, d) float32, pooled for users known only by recent items
    user_ids: np.ndarray  # (n_users,) str
    user_vectors: np.ndarray  # (n_users, d) float32
    popularity: np.ndarray  # (n_items,) float32, the cold-start score
    search: Retriever
    featurize: Featurizer
    score: Scorer
    metadata: ModelMetadata = dataclasses.field(default_factory=ModelMetadata)
    # Items each known user already has (one row per user): never recommended to them again.
    seen: Histories | None = None
    # Candidates per request the ranker was evaluated on; None: the server's n_candidates.
    n_candidates: int | None = None
    # The vector of a user known only by recent items, from those items (None: the mean of
    # the items' vectors).
    encode_history: HistoryEncoder | None = None
    # Text index, filterable attributes and titles (None: no text search or filters).
    catalog: Catalog | None = None
    # Id -> row, held in arrays (no Python object per id: see :mod:`slimrank.serving.id_index`).
    item_row: IdIndex = dataclasses.field(init=False, repr=False)
    user_row: IdIndex = dataclasses.field(init=False, repr=False)
    popular_order: np.ndarray = dataclasses.field(init=False, repr=False)  # (n_items,) rows

    def __post_init__(self) -> None:
        if self.item_vectors.ndim != 2:
            raise ValueError(f"ModelSnapshot: item_vectors {self.item_vectors.shape} must be 2-d")
        n_items, dim = self.item_vectors.shape
        if not self.version:
            raise ValueError("ModelSnapshot.version must not be empty")
        if self.item_ids.shape != (n_items,) or self.popularity.shape != (n_items,):
            raise ValueError(
                f"ModelSnapshot {self.version}: item_ids {self.item_ids.shape} and popularity "
                f"{self.popularity.shape} must both be ({n_items},) like item_vectors"
            )
        if self.user_vectors.ndim != 2 or self.user_vectors.shape[1] != dim:
            raise ValueError(
                f"ModelSnapshot {self.version}: user_vectors {self.user_vectors.shape} "
                f"must be (n_users, {dim})"
            )
        if self.user_ids.shape != (self.user_vectors.shape[0],):
            raise ValueError(
                f"ModelSnapshot {self.version}: user_ids {self.user_ids.shape} do not match "
                f"user_vectors {self.user_vectors.shape}"
            )
        if self.seen is not None and (
            self.seen.n_rows != len(self.user_ids) or self.seen.n_items != n_items
        ):
            raise ValueError(
                f"ModelSnapshot {self.version}: seen has {self.seen.n_rows} users x "
                f"{self.seen.n_items} items, not {len(self.user_ids)} x {n_items}"
            )
        if self.catalog is not None and self.catalog.n_items != n_items:
            raise ValueError(
                f"ModelSnapshot {self.version}: catalog of {self.catalog.n_items} items, "
                f"not {n_items}"
            )
        if self.n_candidates is not None and self.n_candidates < 1:
            raise ValueError(
                f"ModelSnapshot {self.version}: n_candidates {self.n_candidates} must be >= 1"
            )
        try:
            item_row, user_row = IdIndex(self.item_ids), IdIndex(self.user_ids)
        except ValueError as err:
            raise ValueError(f"ModelSnapshot {self.version}: item or user {err}") from None
        order = np.argsort(-self.popularity, kind="stable")
        for name, array in (
            ("item_vectors", self.item_vectors),
            ("user_vectors", self.user_vectors),
        ):
            if array.dtype != np.float32:
                raise ValueError(f"ModelSnapshot {self.version}: {name} must be float32")
        object.__setattr__(self, "item_row", item_row)
        object.__setattr__(self, "user_row", user_row)
        object.__setattr__(self, "popular_order", order)

    @property
    def dim(self) -> int:
        """Embedding dimension of users, items and search queries."""
        return int(self.item_vectors.shape[1])

    @property
    def n_items(self) -> int:
        """Number of items in the index."""
        return int(self.item_vectors.shape[0])

    def item_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Return the ``(m,)`` int64 rows of the ids this snapshot knows, skipping unknown ids."""
        rows = self.item_row.rows(ids)  # (m,) -1 where unknown
        return rows[rows >= 0]

    def seen_rows(self, user_row: int) -> np.ndarray:
        """Return the ``(s,)`` int64 item rows user ``user_row`` already has (none for -1)."""
        if self.seen is None or user_row < 0:
            return np.empty(0, dtype=np.int64)
        return self.seen.row(user_row)

    def user_query(self, user_id: str, recent_item_ids: Sequence[str]) -> UserQuery:
        """Resolve the user: known id, else the recent items this snapshot knows, else popularity.

        A user known by recent items gets ``encode_history`` of them (oldest first: each item
        once, where the request names it last), or without one the mean of their item
        vectors; unknown ids are skipped.
        """
        row = self.user_row.row(user_id) if user_id else -1
        if row >= 0:
            return UserQuery(UserSource.KNOWN, row, self.user_vectors[row])
        recent = self.item_rows(recent_item_ids)  # (r,) request order, repeats kept
        if not recent.size:
            return UserQuery(UserSource.POPULAR, -1, None)
        history = Histories.from_items(recent, self.n_items)  # newest first, distinct
        if self.encode_history is None:
            vector = self.item_vectors[recent].mean(axis=0, dtype=np.float32)  # (d,)
        else:
            vector = self.encode_history(history.items[::-1])  # (d,) oldest first
        return UserQuery(UserSource.RECENT, -1, vector, history)

    def retrieve(self, query: UserQuery, n: int, drop: np.ndarray) -> Retrieved:
        """Return up to ``n`` candidates for the query, best first, minus the rows ``drop``.

        A query with a vector searches the index for ``n + len(drop)`` items, so that
        dropping never leaves fewer than ``n`` when the index reaches enough. An approximate
        index can reach fewer (IVF probes only some lists, and a zero or tiny query can make
        FastScan return nothing): then the rest is filled by :meth:`exact_fill`, so a query
        gets ``n`` candidates whenever the catalog has that many it may be given. The
        popularity fallback takes the most popular items.
        """
        want = min(n + int(drop.size), self.n_items)
        if query.vector is None:
            rows = self.popular_order[:want]
            keep = ~self._dropped(rows, drop)
            rows = rows[keep][:n]
            return Retrieved(rows, self.popularity[rows].astype(np.float32, copy=False))
        scores, rows = self.search(query.vector.reshape(1, -1), want)  # (1, want)
        rows, scores = rows[0], scores[0]
        # A non-finite score is no ranking (FastScan on a zero query): treated as not reached.
        keep = (rows >= 0) & np.isfinite(scores) & ~self._dropped(rows, drop)
        rows = rows[keep][:n].astype(np.int64, copy=False)
        scores = scores[keep][:n].astype(np.float32, copy=False)
        if len(rows) < n:
            rows, scores = self.exact_fill(query.vector, rows, scores, n, drop)
        return Retrieved(rows, scores)

    def _dropped(self, rows: np.ndarray, drop: np.ndarray) -> np.ndarray:
        """``np.isin(rows, drop)`` for item rows (-1 allowed in ``rows``), by marking ``drop``
        in a per-thread array instead of sorting both (a few microseconds per request)."""
        marks = _MARKS.get(self.n_items)  # marks[n_items] stands for -1 and stays False
        drop = drop[(drop >= 0) & (drop < self.n_items)]
        marks[drop] = True
        try:
            return marks[np.where(rows >= 0, rows, self.n_items)]
        finally:
            marks[drop] = False

    def exact_fill(
        self, vector: np.ndarray, rows: np.ndarray, scores: np.ndarray, n: int, drop: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Append to ``(rows, scores)`` the best other items by exact inner product, up to ``n``.

        Items in ``rows`` or ``drop`` are skipped; the index's own results stay first
        (:meth:`exact_best` picks the rest). Taken only when the index came back short.
        """
        free = np.ones(self.n_items, dtype=bool)
        free[rows] = False
        free[drop[(drop >= 0) & (drop < self.n_items)]] = False
        chosen, dots = self.exact_best(vector, free, n - len(rows))
        if not len(chosen):
            return rows, scores
        log.debug("index returned %d of %d candidates; %d added exactly", len(rows), n, len(chosen))
        return (
            np.concatenate([rows, chosen]).astype(np.int64, copy=False),
            np.concatenate([scores, dots]).astype(np.float32, copy=False),
        )

    def exact_best(
        self, vector: np.ndarray | None, keep: np.ndarray, m: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the rows and scores of the ``m`` best items where ``keep`` (an ``(I,)`` bool
        mask) is True: by exact inner product with ``vector``, or by popularity without one.

        Ties (e.g. a zero query) go to the more popular item, then the lower row. One pass over
        the kept items' vectors: bounded by the catalog, for what the index cannot answer.
        """
        free = np.flatnonzero(keep)  # (f,)
        m = min(m, free.size)
        if m <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if vector is None:
            scores = self.popularity.astype(np.float32)  # (n_items,)
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                scores = self.item_vectors @ vector  # (n_items,)
        key = np.where(np.isnan(scores), -np.inf, scores)  # (n_items,)
        # The m-th best kept key; every kept item above it is in, ties at it go to the most
        # popular (a zero query ties them all).
        threshold = key[free[np.argpartition(-key[free], m - 1)[m - 1]]]
        above = free[key[free] > threshold]
        tied = keep & (key == threshold)  # (n_items,)
        tied = self.popular_order[tied[self.popular_order]][: m - above.size]
        chosen = np.concatenate([above, tied])
        # lexsort's last key is the primary one: best score first, then most popular, then row.
        chosen = chosen[np.lexsort((chosen, -self.popularity[chosen], -key[chosen]))]
        return chosen.astype(np.int64, copy=False), scores[chosen].astype(np.float32, copy=False)

    def rank(self, query: UserQuery, retrieved: Retrieved) -> np.ndarray:
        """Return ``(m,)`` float32 scores of the candidates (ranker, or popularity)."""
        if query.vector is None:
            return retrieved.scores
        features = self.featurize(query, retrieved)  # (m, F)
        return np.asarray(self.score(features), dtype=np.float32).reshape(-1)


def top_k(candidates: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``k`` best ``(rows, scores)`` by descending score; ties keep retrieval order."""
    order = np.argsort(-scores, kind="stable")[:k]
    return candidates[order], scores[order]


def warm_up(snapshot: ModelSnapshot, n: int = 50) -> None:
    """Run retrieval and ranking once so a new snapshot's first real call is not the slow one.

    The call is a user known by the ten most popular items, so it runs the history encoder
    and the features of a user known by items too.
    """
    query = snapshot.user_query(
        "", [str(i) for i in snapshot.item_ids[snapshot.popular_order[:10]]]
    )
    if query.vector is None or query.vector.shape != (snapshot.dim,):
        raise ValueError(
            f"snapshot {snapshot.version}: warm-up user vector "
            f"{None if query.vector is None else query.vector.shape} is not ({snapshot.dim},)"
        )
    retrieved = snapshot.retrieve(query, n, np.empty(0, dtype=np.int64))
    scores = snapshot.rank(query, retrieved)
    if scores.shape != retrieved.rows.shape or not np.isfinite(scores).all():
        raise ValueError(
            f"snapshot {snapshot.version}: warm-up scores {scores.shape} are not finite "
            f"or do not match {retrieved.rows.shape} candidates"
        )


@dataclasses.dataclass(frozen=True)
class Served:
    """The served snapshot and when it was swapped in."""

    snapshot: ModelSnapshot
    loaded_at: dt.datetime


class SnapshotHolder:
    """The one mutable reference to the served snapshot.

    ``get`` is a single attribute read, so a request that took a snapshot keeps it for its
    whole life even if ``swap`` replaces it meanwhile. Listeners run after each swap, in swap
    order, e.g. to update the model-info metrics. Reloads run inside ``loading.running()``,
    which admission reads (:class:`~slimrank.serving.admission.LoadActivity`).
    """

    def __init__(self, snapshot: ModelSnapshot) -> None:
        self.loading = LoadActivity()
        self._lock = threading.Lock()
        self._served = Served(snapshot, dt.datetime.now(dt.UTC))
        self._listeners: list[Callable[[ModelSnapshot], None]] = []

    def get(self) -> ModelSnapshot:
        """Return the current snapshot."""
        return self._served.snapshot

    def served(self) -> Served:
        """Return the current snapshot with its load time, read together."""
        return self._served

    def swap(self, new: ModelSnapshot) -> ModelSnapshot:
        """Serve ``new`` from now on and return the snapshot it replaced."""
        with self._lock:
            previous = self._served.snapshot
            self._served = Served(new, dt.datetime.now(dt.UTC))
            for listener in self._listeners:
                listener(new)
        log.info("serving model %s (was %s)", new.version, previous.version)
        return previous

    def subscribe(self, listener: Callable[[ModelSnapshot], None]) -> None:
        """Call ``listener(snapshot)`` now and after every swap."""
        with self._lock:
            self._listeners.append(listener)
            listener(self._served.snapshot)


# How long a reload waits for the calls still running on the old snapshot to finish, so that
# it frees the old snapshot itself; past that, the last call to finish frees it.
RETIRE_TIMEOUT_S = 1.0


def release_when_unused(
    retired: list[ModelSnapshot], timeout_s: float = RETIRE_TIMEOUT_S, poll_s: float = 0.005
) -> bool:
    """Free the snapshot in ``retired`` (emptied; it must hold the caller's only reference) on
    this thread, once the calls still using it have let go of it (at most ``timeout_s``).

    Calls in flight finish on the snapshot they started with, and whoever drops the last
    reference frees it: for a 1M bundle ~2 GiB of arrays, an index and an ONNX session, tens
    of milliseconds that would otherwise fall on the event loop when a call was the last.
    Return True if it was the last reference here, False if calls still held it at the
    deadline (the last of them frees it).
    """
    snapshot = retired.pop()
    deadline = time.monotonic() + timeout_s
    # References: `snapshot` here and getrefcount's own argument.
    while sys.getrefcount(snapshot) > 2:
        if time.monotonic() >= deadline:
            log.info("calls still hold snapshot %s after %.0f s", snapshot.version, timeout_s)
            return False
        time.sleep(poll_s)
    del snapshot
    return True


@dataclasses.dataclass(frozen=True)
class DotPopularityRanker:
    """The simplest real ranker: ``user . item + weight * log1p(popularity)``.

    Features per candidate are ``[user . item, log1p(popularity)]``; the score is their
    weighted sum. It is the exact-search reference that compressed rankers are compared to.
    """

    item_vectors: np.ndarray  # (n_items, d) float32
    popularity: np.ndarray  # (n_items,) float32
    popularity_weight: float = 0.1

    def featurize(self, query: UserQuery, retrieved: Retrieved) -> np.ndarray:
        """Return ``(m, 2)`` float32 features of the candidates."""
        dot = self.item_vectors[retrieved.rows] @ query.vector  # (m,)
        pop = np.log1p(self.popularity[retrieved.rows])  # (m,)
        return np.stack([dot, pop], axis=1).astype(np.float32, copy=False)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Return ``(m,)`` float32 scores of ``(m, 2)`` features."""
        weights = np.asarray([1.0, self.popularity_weight], dtype=np.float32)
        return features @ weights


def build_flat_snapshot(
    version: str,
    item_ids: Sequence[str],
    item_vectors: np.ndarray,
    user_ids: Sequence[str],
    user_vectors: np.ndarray,
    popularity: np.ndarray,
    metadata: ModelMetadata | None = None,
    popularity_weight: float = 0.1,
) -> ModelSnapshot:
    """Build an exact snapshot: inner-product ``IndexFlatIP`` retrieval, dot + popularity ranker."""
    items = np.ascontiguousarray(item_vectors, dtype=np.float32)  # (n_items, d)
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    pop = np.asarray(popularity, dtype=np.float32)
    ranker = DotPopularityRanker(items, pop, popularity_weight)

    def retrieve(queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), n)

    return ModelSnapshot(
        version=version,
        item_ids=np.asarray(item_ids, dtype=str),
        item_vectors=items,
        user_ids=np.asarray(user_ids, dtype=str),
        user_vectors=np.ascontiguousarray(user_vectors, dtype=np.float32),
        popularity=pop,
        search=retrieve,
        featurize=ranker.featurize,
        score=ranker.score,
        metadata=metadata or ModelMetadata(),
    )


def random_snapshot(
    version: str, n_items: int = 500, n_users: int = 100, dim: int = 16, seed: int = 0
) -> ModelSnapshot:
    """Build an exact snapshot over seeded random unit vectors (ids ``i0..``, ``u0..``)."""
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n_items, dim)).astype(np.float32)  # (n_items, d)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    users = rng.standard_normal((n_users, dim)).astype(np.float32)  # (n_users, d)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    popularity = rng.zipf(1.5, n_items).astype(np.float32)  # (n_items,)
    return build_flat_snapshot(
        version,
        [f"i{i}" for i in range(n_items)],
        items,
        [f"u{u}" for u in range(n_users)],
        users,
        popularity,
        ModelMetadata(
            created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            parent_teacher_version="teacher-random",
            metrics={"seed": float(seed)},
        ),
    )
