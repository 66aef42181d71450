"""Serving-time candidate features for one request, from a bundle's feature tables.

Wraps :func:`~slimrank.ranking.features.candidate_features` (the code path training and
evaluation used) as the serving snapshot's ``Featurizer``: ``(user row, user vector, candidate
rows in retrieval order) -> (m, F)``. A known user's features read the bundle's tables, as in
evaluation (including the user's row of ``user_vectors``); the request's vector only gives the
``retrieval_score`` column, the exact inner product with the item vectors (the pipeline used
the FAISS index's scores, equal for exact or refined indexes up to rounding). Unknown users
(row ``-1``) get an empty history, zero side features and the request's vector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from slimrank.ranking.candidates import Candidates
from slimrank.ranking.features import FeatureTables, candidate_features

Featurizer = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def featurizer(tables: FeatureTables) -> Featurizer:
    """Return a thread-safe function computing one request's ``(m, F)`` float32 features."""
    n_items = tables.history.shape[1]
    history = sp.csr_matrix(tables.history)
    empty_history = sp.csr_matrix((1, n_items), dtype=np.float32)
    empty_side = np.zeros((1, tables.user_side.shape[1]), dtype=np.float32)

    def featurize(row: int, vector: np.ndarray, items: np.ndarray) -> np.ndarray:
        items = np.asarray(items, dtype=np.int64)  # (m,)
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)  # (1, d)
        safe = np.where(items >= 0, items, 0)
        scores = np.where(items >= 0, tables.item_vecs[safe] @ vector[0], 0.0)  # (m,)
        scores = scores[None].astype(np.float32)  # (1, m)
        if 0 <= row < history.shape[0]:
            cands = Candidates(np.array([row]), items[None], scores)
            return candidate_features(tables, cands).values[0]  # (m, F)
        # A one-user table whose only user has no history: every history signal is 0.
        cold = dataclasses.replace(
            tables, history=empty_history, user_vecs=vector, user_side=empty_side
        )
        cands = Candidates(np.zeros(1, np.int64), items[None], scores)
        return candidate_features(cold, cands).values[0]  # (m, F)

    return featurize
