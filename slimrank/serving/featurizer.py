"""A pipeline bundle's feature stage: one request's candidates -> ``(m, F)`` ranker inputs.

It calls the offline :func:`~slimrank.ranking.features.candidate_features` (the code training
and evaluation ran) on a one-user batch, so a served user's features are the evaluated ones:

- a known user reads the bundle's tables (history, vector, side features) by row;
- a user known only by recent items gets those items as history (newest first), the vector
  the request resolved, and no side features;
- a query with neither (a vector ``Search``) has an empty history.

``retrieval_score`` is the index's own score of each candidate, as in candidate mining.
"""

from __future__ import annotations

import numpy as np

from slimrank.ranking.candidates import Candidates
from slimrank.ranking.features import (
    FeatureTables,
    UserBatch,
    candidate_features,
    known_users,
    new_user,
)
from slimrank.ranking.histories import Histories
from slimrank.serving.snapshot import Retrieved, UserQuery


class RequestFeaturizer:
    """The feature stage of a snapshot; thread-safe (reads its tables only)."""

    def __init__(self, tables: FeatureTables) -> None:
        self.tables = tables
        self.names = tables.feature_names
        self._empty = Histories(np.zeros(2, np.int64), np.zeros(0, np.int64), tables.n_items)
        self._zero = np.zeros(1, dtype=np.int64)

    def users(self, query: UserQuery) -> UserBatch:
        """Return the one-user batch the query's features read."""
        if query.row >= 0:
            return known_users(self.tables, np.array([query.row]))
        if query.vector is None:
            raise ValueError("a query without a vector has no ranker features")
        history = self._empty if query.history is None else query.history
        return new_user(self.tables, history, query.vector)

    def __call__(self, query: UserQuery, retrieved: Retrieved) -> np.ndarray:
        """Return the ``(m, F)`` float32 features of the retrieved candidates."""
        cands = Candidates(
            self._zero if query.row < 0 else np.array([query.row]),
            retrieved.rows[None],
            retrieved.scores[None],
        )
        return candidate_features(self.tables, cands, self.users(query)).values[0]
