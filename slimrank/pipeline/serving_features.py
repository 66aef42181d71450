"""Serving-time candidate features for one request, from a bundle's feature tables.

Wraps :func:`~slimrank.ranking.features.candidate_features` (the code path training and
evaluation used) as the serving snapshot's ``Featurizer``: ``(user row, user vector, candidate
rows in retrieval order) -> (m, F)``. A known user's features read the bundle's tables, as in
evaluation (including the user's row of ``user_vectors``); the request's vector only gives the
``retrieval_score`` column, the exact inner product with the item vectors (the pipeline used
the FAISS index's scores, equal for exact or refined indexes up to rounding).

A user the tables do not know (row ``-1``) has no side features (zeros) and the request's
vector; :func:`history_featurizer` gives such a user the items they sent as their history, so
the co-occurrence, EASE and user-KNN columns are computed as for a known user with that
history (user-KNN compares them with every known user). Without a history every history
signal is 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from slimrank.ranking.candidates import Candidates
from slimrank.ranking.features import FeatureTables, candidate_features

Featurizer = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
HistoryFeaturizer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _scores(tables: FeatureTables, vector: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Return the ``(1, m)`` float32 inner products of the ``(d,)`` vector with the items."""
    safe = np.where(items >= 0, items, 0)
    scores = np.where(items >= 0, tables.item_vecs[safe] @ vector, 0.0)  # (m,)
    return scores[None].astype(np.float32)


def featurizer(tables: FeatureTables) -> Featurizer:
    """Return a thread-safe function computing one request's ``(m, F)`` float32 features.

    Row ``-1`` (a user the tables do not know) gets an empty history.
    """
    history = sp.csr_matrix(tables.history)
    unknown = history_featurizer(tables)
    no_history = np.empty(0, dtype=np.int64)

    def featurize(row: int, vector: np.ndarray, items: np.ndarray) -> np.ndarray:
        if not 0 <= row < history.shape[0]:
            return unknown(no_history, vector, items)
        items = np.asarray(items, dtype=np.int64)  # (m,)
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)  # (d,)
        cands = Candidates(np.array([row]), items[None], _scores(tables, vector, items))
        return candidate_features(tables, cands).values[0]  # (m, F)

    return featurize


def history_featurizer(tables: FeatureTables) -> HistoryFeaturizer:
    """Return a thread-safe function computing the ``(m, F)`` float32 features of a user the
    tables do not know, given the item rows they sent as history.

    The user is row 0 of the tables the features read: that history (each item once, as the
    tables store histories), no side features, the request's vector. With user-KNN the known
    users' rows follow, so the user is compared with every known user (the table is rebuilt
    per request, O(nnz), which user-KNN's pass over all users costs anyway); the user vector
    and side features are one row, as :func:`candidate_features` reads only the user's row.
    An empty history gives every history signal 0.
    """
    history = sp.csr_matrix(tables.history, dtype=np.float32)
    n_users, n_items = history.shape
    knn = tables.use_user_knn
    # Keep the columns the tables name: the one-row table must compute user-KNN exactly when
    # the full one does, whatever its own number of users.
    if knn:
        most = max(tables.config.user_knn_max_users, n_users + 1)
        config = dataclasses.replace(tables.config, user_knn_max_users=most)
    else:
        config = dataclasses.replace(tables.config, user_knn=0)
    side = np.zeros((1, tables.user_side.shape[1]), dtype=np.float32)  # (1, Fu)
    base = dataclasses.replace(tables, config=config, user_side=side)
    if base.feature_names != tables.feature_names:
        raise RuntimeError(
            f"history features name {base.feature_names}, the tables {tables.feature_names}"
        )

    def user_history(rows: np.ndarray) -> sp.csr_matrix:
        """Return the history table with the user first: ``(1, I)``, or ``(1 + U, I)``."""
        h = len(rows)
        if not knn or h == 0:
            ones = np.ones(h, dtype=np.float32)
            return sp.csr_matrix((ones, rows, np.array([0, h])), shape=(1, n_items))
        indptr = np.concatenate([[0], history.indptr + h])  # (U + 2,)
        indices = np.concatenate([rows, history.indices])
        ones = np.ones(len(indices), dtype=np.float32)
        return sp.csr_matrix((ones, indices, indptr), shape=(n_users + 1, n_items))

    def featurize(history_rows: np.ndarray, vector: np.ndarray, items: np.ndarray) -> np.ndarray:
        items = np.asarray(items, dtype=np.int64)  # (m,)
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)  # (d,)
        rows = np.unique(np.asarray(history_rows, dtype=np.int64))  # (h,) sorted, as stored
        one = dataclasses.replace(base, history=user_history(rows), user_vecs=vector[None])
        cands = Candidates(np.zeros(1, np.int64), items[None], _scores(tables, vector, items))
        return candidate_features(one, cands).values[0]  # (m, F)

    return featurize
