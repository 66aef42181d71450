"""Candidate features: one vectorized step from (users, candidates) to a ``(U, N, F)`` array.

The same :func:`candidate_features` serves training, evaluation and serving (``U = 1``). What it
reads is built once by :func:`build_feature_tables` from the *observed* interactions: the
history fold when mining training candidates, the training matrix when validating or serving
(see :mod:`slimrank.ranking.candidates` on leakage).

Cost per user: every column reads the user's row, the candidates' rows, or each candidate's
``K`` in-neighbour entries of an item-item table checked against the user's history
(:mod:`slimrank.ranking.neighbors`), at most its ``history_cap`` newest items; nothing grows
with the number of users or items.

Columns, in order (:class:`FeatureLayout` fixes names and offsets once per tables):

- ``retrieval_score`` (the index's score), ``retrieval_rank`` (``log1p`` of the position in
  the retrieved list);
- ``item_log_popularity`` (``log1p`` of the item's observed count),
  ``user_log_history`` (``log1p`` of the user's whole observed count);
- ``cooc_sum``, ``cooc_max``, ``cooc_mean``: over the user's history items ``h`` (the
  ``history_cap`` newest), the cosine co-occurrence ``C[h, c]`` among the candidate's
  ``cooc_neighbors`` strongest (item-KNN's neighbourhood);
- ``ease_score``, ``ease_max``: the sum and max over the same items of EASE's weights
  ``B[h, c]`` (Steck 2019), each candidate's ``ease_neighbors`` largest by magnitude; exact
  up to ``ease_max_items`` items, local ridge regressions above (``ease_method``);
- the user's and the item's side features (standardized numerics, one-hot categoricals of small
  cardinality, multi-hots);
- ``user_vec_k``, ``item_vec_k``, ``dot_k``: both towers' embeddings and their product;
- ``cooc_sum_rank``, ``ease_score_rank``: ``log1p`` of the candidate's rank by that signal
  within the user's list (0 = best);
- with ``list_stats`` (off by default, so older tables keep their layout):
  ``retrieval_score_z``, ``cooc_sum_z``, ``ease_score_z``, each signal's z-score over the
  user's real candidates (the gaps between candidates, which a rank drops, without the scale
  that differs between a training fold's shorter history and serving's), and
  ``user_mean_popularity`` and ``popularity_gap``: the mean ``item_log_popularity`` of the
  user's capped history, and the candidate's minus it (how mainstream the user is, and the
  candidate against that). Cost: N per signal, plus the capped history.

Padded candidates (item ``-1``) get all-zero features.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp

from slimrank.config import Config, require
from slimrank.data.dataset import FeatureTable
from slimrank.ranking.candidates import Candidates
from slimrank.ranking.histories import Histories
from slimrank.ranking.neighbors import (
    JointNeighbors,
    NeighborTable,
    cooccurrence_table,
    ease_exact_table,
    ease_local_table,
)

log = logging.getLogger(__name__)

# Signals also given as their log rank within the user's list: ranks do not move when a
# signal's scale does (the history fold of training has fewer items than serving's history).
RANKED = ("cooc_sum", "ease_score")
EASE_METHODS = ("auto", "exact", "local")
# Signals also given as z-scores within the user's list (FeatureConfig.list_stats).
LIST_Z = ("retrieval_score", "cooc_sum", "ease_score")


@dataclasses.dataclass(frozen=True)
class FeatureConfig(Config):
    """What :func:`build_feature_tables` computes and how much of a history it reads."""

    VERSION = 3

    history_cap: int = 1000  # most recent history items the item-item signals read
    cooc_neighbors: int = 100  # strongest co-occurring items kept per item
    ease_lambda: float = 250.0  # L2 of EASE (RecBole default); 0 disables the EASE columns
    ease_neighbors: int = 100  # largest EASE weights (by magnitude) kept per candidate item
    ease_method: str = "auto"  # exact inverse, local ridge, or exact up to ease_max_items
    ease_max_items: int = 20_000  # "auto" inverts the (I, I) Gram matrix up to this many items
    ease_local_neighbors: int = 32  # the neighbourhood of each item's local ridge regression
    max_onehot: int = 64  # categoricals with more values than this are left out
    embeddings: bool = True  # include user_vec, item_vec and their product
    block_pairs: int = 20_000_000  # co-occurrence products per block of items when building
    # Within-list z-scores of the main signals and the user's mean popularity (off: the layout
    # of tables built before it; configs/pipeline.toml turns it on).
    list_stats: bool = False

    def __post_init__(self) -> None:
        for name in ("history_cap", "cooc_neighbors", "ease_neighbors", "ease_local_neighbors"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, self, name, value, "an int >= 1")
        require(self.ease_lambda >= 0, self, "ease_lambda", self.ease_lambda, ">= 0")
        require(
            self.ease_method in EASE_METHODS,
            self,
            "ease_method",
            self.ease_method,
            f"one of {', '.join(EASE_METHODS)}",
        )
        require(self.ease_max_items > 0, self, "ease_max_items", self.ease_max_items, "> 0")
        require(self.max_onehot >= 0, self, "max_onehot", self.max_onehot, ">= 0")
        require(self.block_pairs > 0, self, "block_pairs", self.block_pairs, "> 0")

    def ease_is_exact(self, n_items: int) -> bool:
        """Whether EASE's weights come from the exact inverse for a catalog of ``n_items``."""
        if self.ease_method == "auto":
            return n_items <= self.ease_max_items
        return self.ease_method == "exact"


@dataclasses.dataclass(frozen=True)
class FeatureLayout:
    """The feature columns' names and, per name, its column (fixed once per tables)."""

    names: tuple[str, ...]
    column: Mapping[str, int]  # a plain dict (picklable, for the Ray engine); never mutated

    @classmethod
    def of(
        cls,
        config: FeatureConfig,
        has_ease: bool,
        user_side_names: tuple[str, ...],
        item_side_names: tuple[str, ...],
        dim: int,
    ) -> FeatureLayout:
        names = ["retrieval_score", "retrieval_rank", "item_log_popularity", "user_log_history"]
        names += ["cooc_sum", "cooc_max", "cooc_mean"]
        if has_ease:
            names += ["ease_score", "ease_max"]
        names += [f"user_{n}" for n in user_side_names]
        names += [f"item_{n}" for n in item_side_names]
        if config.embeddings:
            for prefix in ("user_vec", "item_vec", "dot"):
                names += [f"{prefix}_{k}" for k in range(dim)]
        names += [f"{n}_rank" for n in RANKED if n in names]
        if config.list_stats:
            names += [f"{n}_z" for n in LIST_Z if n in names]
            names += ["user_mean_popularity", "popularity_gap"]
        return cls(tuple(names), {n: i for i, n in enumerate(names)})

    def __len__(self) -> int:
        return len(self.names)


@dataclasses.dataclass(frozen=True)
class FeatureTables:
    """Everything candidate features are read from (built by :func:`build_feature_tables`)."""

    config: FeatureConfig
    history: Histories  # (n_users rows) the observed interactions, newest first
    user_vecs: np.ndarray  # (n_users, d) float32
    item_vecs: np.ndarray  # (n_items, d) float32
    item_log_popularity: np.ndarray  # (n_items,) float32
    user_side: np.ndarray  # (n_users, Fu) float32
    user_side_names: tuple[str, ...]
    item_side: np.ndarray  # (n_items, Fi) float32
    item_side_names: tuple[str, ...]
    cooc: NeighborTable
    ease: NeighborTable | None
    layout: FeatureLayout = dataclasses.field(init=False, repr=False, compare=False)
    # cooc and ease side by side (a request gathers both at once); cooc and ease become views.
    neighbors: JointNeighbors = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n_users, n_items = self.history.n_rows, self.history.n_items
        if self.user_vecs.shape[0] != n_users or self.item_vecs.shape[0] != n_items:
            raise ValueError(
                f"user_vecs {self.user_vecs.shape} / item_vecs {self.item_vecs.shape} do not "
                f"match {n_users} users x {n_items} items"
            )
        if self.user_vecs.shape[1] != self.item_vecs.shape[1]:
            raise ValueError(
                f"user_vecs {self.user_vecs.shape} and item_vecs {self.item_vecs.shape} differ in d"
            )
        if self.user_side.shape[0] != n_users or self.item_side.shape[0] != n_items:
            raise ValueError("side feature rows do not match the users and items")
        for name, table in (("cooc", self.cooc), ("ease", self.ease)):
            if table is not None and table.n_items != n_items:
                raise ValueError(f"{name} table has {table.n_items} rows, expected {n_items}")
        layout = FeatureLayout.of(
            self.config,
            self.ease is not None,
            self.user_side_names,
            self.item_side_names,
            self.user_vecs.shape[1],
        )
        object.__setattr__(self, "layout", layout)
        joint = JointNeighbors.of((self.cooc,) if self.ease is None else (self.cooc, self.ease))
        object.__setattr__(self, "neighbors", joint)
        object.__setattr__(self, "cooc", joint.table(0))
        if self.ease is not None:
            object.__setattr__(self, "ease", joint.table(1))

    def __reduce__(self) -> tuple:
        # Pickled (the Ray engine) as its init fields; the joint table is rebuilt, not shipped.
        fields = (f.name for f in dataclasses.fields(self) if f.init)
        return (type(self), tuple(getattr(self, name) for name in fields))

    @property
    def n_users(self) -> int:
        return self.history.n_rows

    @property
    def n_items(self) -> int:
        return self.history.n_items

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Return the names of the F columns :func:`candidate_features` produces."""
        return self.layout.names


@dataclasses.dataclass(frozen=True)
class UserBatch:
    """What features read of ``U`` users: capped histories, full lengths, vectors, side rows."""

    history: Histories  # (U rows) at most history_cap items each, newest first
    n_history: np.ndarray  # (U,) whole observed history lengths
    vectors: np.ndarray  # (U, d) float32
    side: np.ndarray  # (U, Fu) float32


def known_users(tables: FeatureTables, rows: np.ndarray) -> UserBatch:
    """Return the batch of users the tables know, by table row."""
    rows = np.asarray(rows, dtype=np.int64)
    return UserBatch(
        tables.history.recent(rows, tables.config.history_cap),
        tables.history.indptr[rows + 1] - tables.history.indptr[rows],  # not O(n_users)
        tables.user_vecs[rows],
        tables.user_side[rows],
    )


def new_user(tables: FeatureTables, history: Histories, vector: np.ndarray) -> UserBatch:
    """Return the one-user batch of a user the tables do not know: the items they sent as
    history (one row, newest first), the request's ``(d,)`` vector and no side features."""
    if history.n_rows != 1:
        raise ValueError(f"new_user takes one history row, got {history.n_rows}")
    capped = history.recent(np.zeros(1, np.int64), tables.config.history_cap)
    vec = np.asarray(vector, dtype=np.float32).reshape(1, -1)
    side = np.zeros((1, tables.user_side.shape[1]), dtype=np.float32)
    return UserBatch(capped, history.lengths, vec, side)


@dataclasses.dataclass(frozen=True)
class CandidateFeatures:
    """Features of candidates: ``values`` (U, N, F) float32 named by ``names``.

    ``user`` (U,) and ``items`` (U, N, -1 pads) are kept beside the values for models that
    embed ids; ``mask`` marks the real candidates.
    """

    values: np.ndarray
    names: tuple[str, ...]
    user: np.ndarray
    items: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.items >= 0

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows: np.ndarray) -> CandidateFeatures:
        """Return the features of the selected users (mask or indices)."""
        return CandidateFeatures(self.values[rows], self.names, self.user[rows], self.items[rows])


def side_matrix(table: FeatureTable | None, n_rows: int, max_onehot: int) -> tuple:
    """Return ``(values (n_rows, F) float32, names)`` of a feature table, ready for a model.

    Numerics are standardized (z-scores over the rows), categoricals with at most
    ``max_onehot`` values one-hot encoded, multi-hots kept as they are.
    """
    if table is None:
        return np.zeros((n_rows, 0), dtype=np.float32), ()
    if table.n_rows != n_rows:
        raise ValueError(f"feature table has {table.n_rows} rows, expected {n_rows}")
    cols: list[np.ndarray] = []
    names: list[str] = []
    for name, codes in table.categorical.items():
        card = table.cardinality[name]
        if card > max_onehot:
            log.info("categorical %r has %d values (> %d): left out", name, card, max_onehot)
            continue
        cols.append(np.eye(card, dtype=np.float32)[codes])
        names += [f"{name}={v}" for v in range(card)]
    for name, values in table.numeric.items():
        values = np.asarray(values, dtype=np.float64)
        std = values.std()
        z = (values - values.mean()) / (std if std > 0 else 1.0)
        cols.append(z.astype(np.float32)[:, None])
        names.append(name)
    for name, values in table.multi_hot.items():
        cols.append(np.asarray(values, dtype=np.float32))
        names += [f"{name}[{j}]" for j in range(values.shape[1])]
    if not cols:
        return np.zeros((n_rows, 0), dtype=np.float32), ()
    return np.concatenate(cols, axis=1), tuple(names)


def item_item_tables(
    observed: sp.csr_matrix, config: FeatureConfig
) -> tuple[NeighborTable, NeighborTable | None]:
    """Return the co-occurrence and (``ease_lambda`` > 0) EASE neighbours of ``observed``."""
    n_items = observed.shape[1]
    cooc = cooccurrence_table(observed, config.cooc_neighbors, config.block_pairs)
    if config.ease_lambda <= 0:
        return cooc, None
    if config.ease_is_exact(n_items):
        return cooc, ease_exact_table(observed, config.ease_lambda, config.ease_neighbors)
    log.info(
        "EASE: local ridge over %d neighbours (%d items)", config.ease_local_neighbors, n_items
    )
    ease = ease_local_table(
        observed, cooc, config.ease_lambda, config.ease_neighbors, config.ease_local_neighbors
    )
    return cooc, ease


def build_feature_tables(
    history: sp.spmatrix,
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    user_features: FeatureTable | None = None,
    item_features: FeatureTable | None = None,
    config: FeatureConfig | None = None,
    time: sp.spmatrix | None = None,
    item_item: FeatureTables | None = None,
    item_history: sp.spmatrix | None = None,
) -> FeatureTables:
    """Return the tables of features read from ``history`` (the observed interactions).

    ``time`` (same shape, e.g. :func:`~slimrank.ranking.histories.latest_times`) orders each
    user's history newest first, which decides the ``history_cap`` items the item-item
    signals read; without it histories are in item-row order.

    ``item_item``: tables whose co-occurrence and EASE neighbours are reused instead of built
    (the costly part at catalog scale); the caller must have built them from a subset of
    ``history``, or the features leak what ``history`` does not hold.

    ``item_history`` (same shape): the interactions the item statistics (popularity,
    co-occurrence, EASE) are read from instead of ``history``, whose rows still give each
    user's own history. Training folds pass every user's items but the labels of the users
    whose lists are trained on, so that the item statistics are as complete as the served
    ones; it must hold none of the labels the features are trained against.
    """
    config = config or FeatureConfig()
    hist = Histories.from_matrix(history, time)
    observed = hist.matrix()
    n_users, n_items = observed.shape
    if item_history is not None:
        if item_history.shape != observed.shape:
            raise ValueError(
                f"item_history {item_history.shape} does not match history {observed.shape}"
            )
        observed = Histories.from_matrix(item_history).matrix()
    user_vecs = np.ascontiguousarray(user_vecs, dtype=np.float32)
    item_vecs = np.ascontiguousarray(item_vecs, dtype=np.float32)
    popularity = np.bincount(observed.indices, minlength=n_items)
    user_side, user_names = side_matrix(user_features, n_users, config.max_onehot)
    item_side, item_names = side_matrix(item_features, n_items, config.max_onehot)
    if item_item is not None:
        if item_item.config != config or item_item.history.n_items != n_items:
            raise ValueError("item_item tables were built with another config or catalog")
        cooc, ease = item_item.cooc, item_item.ease
    else:
        cooc, ease = item_item_tables(observed, config)
    return FeatureTables(
        config=config,
        history=hist,
        user_vecs=user_vecs,
        item_vecs=item_vecs,
        item_log_popularity=np.log1p(popularity).astype(np.float32),
        user_side=user_side,
        user_side_names=user_names,
        item_side=item_side,
        item_side_names=item_names,
        cooc=cooc,
        ease=ease,
    )


@functools.lru_cache(maxsize=8)
def _log1p_range(n: int, precision: type = np.float64) -> np.ndarray:
    """Return the read-only float32 ``log1p(0 .. n - 1)``, computed once per ``n`` in
    ``precision`` (each column keeps the rounding its trained rankers saw)."""
    values = np.log1p(np.arange(n, dtype=precision)).astype(np.float32)
    values.flags.writeable = False
    return values


def _list_stats(
    out: np.ndarray,
    at: int,
    col: Mapping[str, int],
    mask: np.ndarray,
    all_real: bool,
    history: Histories,
    tables: FeatureTables,
    safe: np.ndarray,
) -> int:
    """Fill the ``list_stats`` columns of ``out`` (U, N, F) from column ``at``; return the next.

    Z-scores are over each user's real candidates (0 where a list's signal is constant);
    the mean popularity is over the capped history (0 for an empty one).
    """
    real = mask.astype(np.float32)
    count = np.maximum(real.sum(axis=1, keepdims=True), 1.0)  # (U, 1)
    for name in LIST_Z:
        if name not in col:
            continue
        values = out[:, :, col[name]]  # (U, N)
        if not all_real:
            values = values * real
        mean = values.sum(axis=1, keepdims=True) / count
        centred = values - mean
        if not all_real:
            centred *= real
        std = np.sqrt((centred * centred).sum(axis=1, keepdims=True) / count)
        out[:, :, at] = centred / np.where(std > 0, std, 1.0)
        at += 1
    lengths = history.lengths
    rows = np.repeat(np.arange(len(lengths)), lengths)
    total = np.bincount(rows, tables.item_log_popularity[history.items], minlength=len(lengths))
    user_mean = (total / np.maximum(lengths, 1)).astype(np.float32)[:, None]  # (U, 1)
    out[:, :, at] = user_mean
    out[:, :, at + 1] = tables.item_log_popularity[safe] - user_mean
    return at + 2


def candidate_features(
    tables: FeatureTables, cands: Candidates, users: UserBatch | None = None
) -> CandidateFeatures:
    """Return the (U, N, F) features of ``cands``; deterministic, zero at padded candidates.

    ``users`` are the rows' users (default: the tables' users ``cands.user``, as offline);
    serving passes a :func:`new_user` batch for a user known only by the items they sent.
    """
    cfg = tables.config
    users = known_users(tables, cands.user) if users is None else users
    items = cands.items
    mask = cands.mask  # (U, N)
    all_real = bool(mask.all())
    safe = items if all_real else np.where(mask, items, 0)  # pads read item 0, zeroed later
    n_users, n = items.shape
    layout = tables.layout
    col = layout.column
    out = np.empty((n_users, n, len(layout)), dtype=np.float32)  # (U, N, F)
    out[:, :, 0] = cands.retrieval_score
    out[:, :, 1] = _log1p_range(n, np.float32)[None, :]
    out[:, :, 2] = tables.item_log_popularity[safe]
    out[:, :, 3] = np.log1p(users.n_history.astype(np.float32))[:, None]
    used = np.maximum(users.history.lengths, 1).astype(np.float32)[:, None]  # (U, 1)
    signals = tables.neighbors.signals(users.history, items)
    c_sum, c_max = signals[0]
    out[:, :, 4] = c_sum
    out[:, :, 5] = c_max
    out[:, :, 6] = c_sum / used
    if tables.ease is not None:
        e_sum, e_max = signals[1]
        out[:, :, col["ease_score"]] = e_sum
        out[:, :, col["ease_max"]] = e_max
    at = 7 + 2 * int(tables.ease is not None)
    fu, fi = users.side.shape[1], tables.item_side.shape[1]
    out[:, :, at : at + fu] = users.side[:, None, :]
    at += fu
    out[:, :, at : at + fi] = tables.item_side[safe]
    at += fi
    if cfg.embeddings:
        d = tables.item_vecs.shape[1]
        u = users.vectors[:, None, :]  # (U, 1, d)
        v = tables.item_vecs[safe]  # (U, N, d)
        out[:, :, at : at + d] = u
        out[:, :, at + d : at + 2 * d] = v
        np.multiply(u, v, out=out[:, :, at + 2 * d : at + 3 * d])
        at += 3 * d
    for name in RANKED:
        if name in col:
            values = out[:, :, col[name]]  # (U, N)
            if not all_real:
                values = np.where(mask, values, -np.inf)
            order = np.argsort(-values, axis=1, kind="stable")
            # Position j of the order gets log1p(j): rank[order[j]] = j, without a second sort.
            out[np.arange(n_users)[:, None], order, at] = _log1p_range(n)[None, :]
            at += 1
    if cfg.list_stats:
        at = _list_stats(out, at, col, mask, all_real, users.history, tables, safe)
    if at != len(layout):
        raise RuntimeError(f"filled {at} feature columns but named {len(layout)}")
    if not all_real:
        out[~mask] = 0.0
    return CandidateFeatures(out, layout.names, cands.user.copy(), items.copy())
