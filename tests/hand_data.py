"""Small hand-written interaction data for the evaluation tests."""

from __future__ import annotations

import numpy as np

from slimrank.data.dataset import Interactions


def interactions_of(pairs: list[tuple[int, int]]) -> Interactions:
    """Return ``(user, item)`` pairs as interactions: rating 1, timestamp 0."""
    user, item = np.array(pairs).T
    n = len(pairs)
    return Interactions(user, item, np.ones(n, dtype=np.float32), np.zeros(n, dtype=np.int64))
