"""Candidate features: one vectorized step from (users, candidates) to a ``(U, N, F)`` array.

The same :func:`candidate_features` serves training, evaluation and serving (``U = 1``). What it
reads is built once by :func:`build_feature_tables` from the *observed* interactions: the
history fold when mining training candidates, the training matrix when validating or serving
(see :mod:`slimrank.ranking.candidates` on leakage).

Columns, in order (``feature_names`` says which exist):

- ``retrieval_score``, ``retrieval_rank`` (``log1p`` of the position in the retrieved list);
- ``item_log_popularity`` (``log1p`` of the item's observed count),
  ``user_log_history`` (``log1p`` of the user's observed count);
- ``cooc_sum``, ``cooc_max``, ``cooc_mean``: over the user's history items ``h`` of the cosine
  co-occurrence ``C[h, c] = |users(h) & users(c)| / sqrt(|users(h)| |users(c)|)``, each row of
  ``C`` truncated to its ``cooc_neighbors`` largest entries;
- ``ease_score``, ``ease_max``: the sum (the EASE score) and max over the history of EASE's
  item-item weights ``B[h, c]`` (Steck 2019), when the catalog is small enough to invert;
- the user's and the item's side features (standardized numerics, one-hot categoricals of small
  cardinality, multi-hots);
- ``user_knn``: the summed cosine similarity of the user's ``user_knn`` nearest users that
  have the candidate;
- ``user_vec_k``, ``item_vec_k``, ``dot_k``: both towers' embeddings and their product;
- ``cooc_sum_rank``, ``ease_score_rank``, ``user_knn_rank``: ``log1p`` of the candidate's rank
  by that signal within the user's list (0 = best).

Padded candidates (item ``-1``) get all-zero features.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from slimrank.config import Config, require
from slimrank.data.dataset import FeatureTable
from slimrank.evaluation.baselines import EaseConfig, ease_weights
from slimrank.ranking.candidates import Candidates

log = logging.getLogger(__name__)

# Signals also given as their log rank within the user's list: ranks do not move when a
# signal's scale does (the history fold of training has fewer items than serving's history).
RANKED = ("cooc_sum", "ease_score", "user_knn")


@dataclasses.dataclass(frozen=True)
class FeatureConfig(Config):
    """What :func:`build_feature_tables` computes."""

    cooc_neighbors: int = 200  # strongest co-occurrences kept per item; 0 keeps all
    ease_lambda: float = 250.0  # L2 of EASE (RecBole default); 0 disables the EASE columns
    ease_max_items: int = 20_000  # EASE inverts an (I, I) matrix: skipped above this
    user_knn: int = 50  # neighbours of the user-KNN score; 0 disables it
    user_knn_max_users: int = 200_000  # user-KNN compares with every user: skipped above this
    max_onehot: int = 64  # categoricals with more values than this are left out
    embeddings: bool = True  # include user_vec, item_vec and their product
    chunk_pairs: int = 4_000_000  # (history item, candidate) pairs looked up at once

    def __post_init__(self) -> None:
        require(self.cooc_neighbors >= 0, self, "cooc_neighbors", self.cooc_neighbors, ">= 0")
        require(self.ease_lambda >= 0, self, "ease_lambda", self.ease_lambda, ">= 0")
        require(self.ease_max_items > 0, self, "ease_max_items", self.ease_max_items, "> 0")
        require(self.user_knn >= 0, self, "user_knn", self.user_knn, ">= 0")
        require(
            self.user_knn_max_users > 0,
            self,
            "user_knn_max_users",
            self.user_knn_max_users,
            "> 0",
        )
        require(self.max_onehot >= 0, self, "max_onehot", self.max_onehot, ">= 0")
        require(self.chunk_pairs > 0, self, "chunk_pairs", self.chunk_pairs, "> 0")


@dataclasses.dataclass(frozen=True)
class ItemItem:
    """An ``(I, I)`` item-item weight table with vectorized ``(row, col)`` lookups.

    Stored as sorted ``row * n_items + col`` keys (binary-searched) or, when at least an
    eighth full and small enough (``DENSE_MAX_ITEMS``), as a dense matrix: random binary
    searches into millions of keys cost ~10 ms per served user, dense indexing well under 1.
    """

    n_items: int
    keys: np.ndarray  # (nnz,) int64, sorted: row * n_items + col
    values: np.ndarray  # (nnz,) float32
    dense: np.ndarray | None = None  # (I, I) float32, or None

    DENSE_MAX_ITEMS: ClassVar[int] = 8192

    @classmethod
    def from_csr(cls, matrix: sp.csr_matrix) -> ItemItem:
        m = sp.csr_matrix(matrix, dtype=np.float32)
        m.eliminate_zeros()
        m.sort_indices()
        n = m.shape[0]
        if n <= cls.DENSE_MAX_ITEMS and m.nnz * 8 >= n * n:
            empty = np.zeros(0, dtype=np.int64)
            return cls(n, empty, empty.astype(np.float32), m.toarray())
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(m.indptr))
        return cls(n, rows * m.shape[1] + m.indices.astype(np.int64), m.data.copy())

    def lookup(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Return the weights at broadcast ``(rows, cols)``; 0 where absent or negative index."""
        rows, cols = np.broadcast_arrays(np.asarray(rows, np.int64), np.asarray(cols, np.int64))
        valid = (rows >= 0) & (cols >= 0)
        if self.dense is not None:
            got = self.dense[np.where(valid, rows, 0), np.where(valid, cols, 0)]
            return np.where(valid, got, 0.0).astype(np.float32)
        out = np.zeros(rows.shape, dtype=np.float32)
        if len(self.keys) == 0:
            return out
        query = np.where(valid, rows * self.n_items + cols, -1)
        pos = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        found = valid & (self.keys[pos] == query)
        out[found] = self.values[pos[found]]
        return out

    def to_csr(self) -> sp.csr_matrix:
        if self.dense is not None:
            return sp.csr_matrix(self.dense)
        rows, cols = np.divmod(self.keys, self.n_items)
        shape = (self.n_items, self.n_items)
        return sp.csr_matrix((self.values, (rows, cols)), shape=shape)


@dataclasses.dataclass(frozen=True)
class FeatureTables:
    """Everything candidate features are read from (built by :func:`build_feature_tables`)."""

    config: FeatureConfig
    history: sp.csr_matrix  # (n_users, n_items) binary: the observed interactions
    user_vecs: np.ndarray  # (n_users, d) float32
    item_vecs: np.ndarray  # (n_items, d) float32
    item_log_popularity: np.ndarray  # (n_items,) float32
    user_side: np.ndarray  # (n_users, Fu) float32
    user_side_names: tuple[str, ...]
    item_side: np.ndarray  # (n_items, Fi) float32
    item_side_names: tuple[str, ...]
    cooc: ItemItem
    ease: ItemItem | None

    @property
    def use_user_knn(self) -> bool:
        """Whether the ``user_knn`` column is computed."""
        n_users = self.history.shape[0]
        return self.config.user_knn > 0 and n_users <= self.config.user_knn_max_users

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Return the names of the F columns :func:`candidate_features` produces."""
        names = ["retrieval_score", "retrieval_rank", "item_log_popularity", "user_log_history"]
        names += ["cooc_sum", "cooc_max", "cooc_mean"]
        if self.ease is not None:
            names += ["ease_score", "ease_max"]
        if self.use_user_knn:
            names.append("user_knn")
        names += [f"user_{n}" for n in self.user_side_names]
        names += [f"item_{n}" for n in self.item_side_names]
        if self.config.embeddings:
            d = self.user_vecs.shape[1]
            for prefix in ("user_vec", "item_vec", "dot"):
                names += [f"{prefix}_{k}" for k in range(d)]
        names += [f"{n}_rank" for n in RANKED if n in names]
        return tuple(names)


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


def top_per_row(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Return ``matrix`` keeping the ``k`` largest entries of each row (``k=0`` keeps all)."""
    m = sp.csr_matrix(matrix)
    if k == 0:
        return m
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    order = np.lexsort((-m.data, rows))  # by row, largest first
    rank = np.empty(m.nnz, dtype=np.int64)
    rank[order] = np.arange(m.nnz) - np.repeat(m.indptr[:-1], np.diff(m.indptr))
    keep = rank < k
    out = sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)
    out.sort_indices()
    return out


def cooccurrence(history: sp.csr_matrix, neighbors: int = 0) -> sp.csr_matrix:
    """Return the cosine item-item co-occurrence ``(I, I)`` of binary ``history``, diagonal 0."""
    x = sp.csr_matrix(history, dtype=np.float32)
    c = sp.csr_matrix(x.T @ x)  # (I, I) co-occurrence counts
    counts = np.asarray(x.sum(axis=0)).ravel()
    c.setdiag(0)
    c.eliminate_zeros()
    inv = 1.0 / np.sqrt(np.maximum(counts, 1.0))
    c = sp.csr_matrix(sp.diags(inv) @ c @ sp.diags(inv), dtype=np.float32)
    return top_per_row(c, neighbors)


def build_feature_tables(
    history: sp.csr_matrix,
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    user_features: FeatureTable | None = None,
    item_features: FeatureTable | None = None,
    config: FeatureConfig | None = None,
) -> FeatureTables:
    """Return the tables of features read from ``history`` (the observed interactions)."""
    config = config or FeatureConfig()
    history = sp.csr_matrix(history, dtype=np.float32)
    history.sum_duplicates()
    history.data[:] = 1.0
    history.sort_indices()
    n_users, n_items = history.shape
    user_vecs = np.ascontiguousarray(user_vecs, dtype=np.float32)
    item_vecs = np.ascontiguousarray(item_vecs, dtype=np.float32)
    if user_vecs.shape[0] != n_users or item_vecs.shape[0] != n_items:
        raise ValueError(
            f"user_vecs {user_vecs.shape} / item_vecs {item_vecs.shape} do not match "
            f"history {history.shape}"
        )
    if user_vecs.shape[1] != item_vecs.shape[1]:
        raise ValueError(f"user_vecs {user_vecs.shape} and item_vecs {item_vecs.shape} differ in d")
    popularity = np.asarray(history.sum(axis=0)).ravel()
    user_side, user_names = side_matrix(user_features, n_users, config.max_onehot)
    item_side, item_names = side_matrix(item_features, n_items, config.max_onehot)
    ease = None
    if config.ease_lambda > 0 and n_items <= config.ease_max_items:
        weights = ease_weights(history, EaseConfig(l2=config.ease_lambda))  # (I, I)
        ease = ItemItem.from_csr(sp.csr_matrix(weights))
    elif config.ease_lambda > 0:
        log.info("EASE columns left out: %d items > ease_max_items", n_items)
    return FeatureTables(
        config=config,
        history=history,
        user_vecs=user_vecs,
        item_vecs=item_vecs,
        item_log_popularity=np.log1p(popularity).astype(np.float32),
        user_side=user_side,
        user_side_names=user_names,
        item_side=item_side,
        item_side_names=item_names,
        cooc=ItemItem.from_csr(cooccurrence(history, config.cooc_neighbors)),
        ease=ease,
    )


def history_signals(
    history: sp.csr_matrix,
    weights: ItemItem,
    users: np.ndarray,
    items: np.ndarray,
    chunk_pairs: int = 4_000_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(sum, max)``, each (U, N), of ``weights[h, items[u, n]]`` over ``h`` in history.

    Weights absent from the table count as 0; users with no history get 0 for both.
    """
    hist = sp.csr_matrix(history)[users]  # (U, I)
    n_users, n = items.shape
    total = np.zeros((n_users, n), dtype=np.float32)
    best = np.zeros((n_users, n), dtype=np.float32)
    counts = np.diff(hist.indptr)
    start = 0
    while start < n_users:
        # Grow the chunk of users while its (history item, candidate) pairs fit the budget.
        cum = np.cumsum(counts[start:]) * n
        stop = start + max(1, int(np.searchsorted(cum, chunk_pairs, side="right")))
        rows = np.flatnonzero(counts[start:stop] > 0) + start
        if len(rows):
            lo, hi = hist.indptr[start], hist.indptr[stop]
            row_of = np.repeat(np.arange(start, stop), counts[start:stop])  # (P,)
            vals = weights.lookup(hist.indices[lo:hi, None], items[row_of])  # (P, N)
            seg = hist.indptr[rows] - lo
            total[rows] = np.add.reduceat(vals, seg, axis=0)
            best[rows] = np.maximum.reduceat(vals, seg, axis=0)
        start = stop
    return total, best


def user_knn_scores(
    history: sp.csr_matrix,
    users: np.ndarray,
    items: np.ndarray,
    k: int,
    chunk_cells: int = 4_000_000,
) -> np.ndarray:
    """Return (U, N) user-KNN scores: the summed cosine similarity of the user's ``k`` most
    similar other users (by observed items) that have the candidate item."""
    h = sp.csr_matrix(history, dtype=np.float32)
    n_users = h.shape[0]
    inv = 1.0 / np.sqrt(np.maximum(np.diff(h.indptr), 1)).astype(np.float32)  # (n_users,)
    out = np.zeros(items.shape, dtype=np.float32)
    safe = np.where(items >= 0, items, 0)
    step = max(1, chunk_cells // max(n_users, 1))
    k_eff = min(k, n_users - 1)
    for start in range(0, len(users), step):
        rows = users[start : start + step]
        sims = (h[rows] @ h.T).toarray() * inv[rows][:, None] * inv[None, :]  # (C, n_users)
        sims[np.arange(len(rows)), rows] = 0.0  # not one's own neighbour
        if k_eff <= 0:
            continue
        if k_eff < n_users:
            cut = np.partition(sims, n_users - k_eff, axis=1)[:, n_users - k_eff][:, None]
            # Ties at the cut keep every tied user: deterministic, at most a few extra.
            sims = np.where(sims >= cut, sims, 0.0)
        scores = np.asarray((h.T @ sims.T).T)  # (C, I)
        out[start : start + step] = np.take_along_axis(scores, safe[start : start + step], axis=1)
    return np.where(items >= 0, out, 0.0).astype(np.float32)


def candidate_features(tables: FeatureTables, cands: Candidates) -> CandidateFeatures:
    """Return the (U, N, F) features of ``cands``; deterministic, zero at padded candidates."""
    cfg = tables.config
    user, items = cands.user, cands.items
    mask = cands.mask  # (U, N)
    safe = np.where(mask, items, 0)  # pads read item 0, zeroed at the end
    n_users, n = items.shape
    hist_len = np.diff(tables.history.indptr)[user].astype(np.float32)  # (U,)
    names = tables.feature_names
    out = np.empty((n_users, n, len(names)), dtype=np.float32)  # (U, N, F)
    out[:, :, 0] = cands.retrieval_score
    out[:, :, 1] = np.log1p(np.arange(n, dtype=np.float32))[None, :]
    out[:, :, 2] = tables.item_log_popularity[safe]
    out[:, :, 3] = np.log1p(hist_len)[:, None]
    c_sum, c_max = history_signals(tables.history, tables.cooc, user, items, cfg.chunk_pairs)
    out[:, :, 4] = c_sum
    out[:, :, 5] = c_max
    out[:, :, 6] = c_sum / np.maximum(hist_len, 1.0)[:, None]
    col = 7
    if tables.ease is not None:
        e_sum, e_max = history_signals(tables.history, tables.ease, user, items, cfg.chunk_pairs)
        out[:, :, col] = e_sum
        out[:, :, col + 1] = e_max
        col += 2
    if tables.use_user_knn:
        out[:, :, col] = user_knn_scores(tables.history, user, items, cfg.user_knn)
        col += 1
    fu, fi = tables.user_side.shape[1], tables.item_side.shape[1]
    out[:, :, col : col + fu] = tables.user_side[user][:, None, :]
    col += fu
    out[:, :, col : col + fi] = tables.item_side[safe]
    col += fi
    if cfg.embeddings:
        d = tables.user_vecs.shape[1]
        u = tables.user_vecs[user][:, None, :]  # (U, 1, d)
        v = tables.item_vecs[safe]  # (U, N, d)
        out[:, :, col : col + d] = u
        out[:, :, col + d : col + 2 * d] = v
        out[:, :, col + 2 * d : col + 3 * d] = u * v
        col += 3 * d
    for name in RANKED:
        if name in names:
            values = np.where(mask, out[:, :, names.index(name)], -np.inf)  # (U, N)
            order = np.argsort(-values, axis=1, kind="stable")
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(n)[None, :], axis=1)
            out[:, :, col] = np.log1p(rank)
            col += 1
    if col != len(names):
        raise RuntimeError(f"filled {col} feature columns but named {len(names)}")
    out[~mask] = 0.0
    return CandidateFeatures(out, names, user.copy(), items.copy())
