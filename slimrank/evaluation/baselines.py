"""Reference recommenders that need no training loop: most-popular and EASE.

Both are fitted on the training part of a :class:`~slimrank.data.dataset.Split` only and
evaluated with :func:`~slimrank.evaluation.protocol.evaluate_full_ranking`, so their numbers
check the protocol against RecBole's published ones (EASE reaches test NDCG@10 0.330 there).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp

from slimrank.config import Config, require
from slimrank.data.dataset import Split, item_popularity
from slimrank.evaluation.protocol import ScoreFn, evaluate_full_ranking

# RecBole 1.2.1 on ml-100k, RS 80/10/10 by user, full ranking: test Recall/NDCG/MRR/Hit@10.
RECBOLE_ANCHORS: dict[str, dict[str, float]] = {
    "BPR": {"recall@10": 0.247, "ndcg@10": 0.293, "mrr@10": 0.490, "hit@10": 0.782},
    "LightGCN": {"recall@10": 0.258, "ndcg@10": 0.305, "mrr@10": 0.503, "hit@10": 0.805},
    "EASE": {"recall@10": 0.281, "ndcg@10": 0.330, "mrr@10": 0.528, "hit@10": 0.820},
}


@dataclasses.dataclass(frozen=True)
class EaseConfig(Config):
    """EASE's L2 weight on the item-item matrix (RecBole's ``reg_weight``, default 250)."""

    l2: float = 250.0

    def __post_init__(self) -> None:
        require(self.l2 > 0, self, "l2", self.l2, "must be positive")


def most_popular_scorer(popularity: np.ndarray) -> ScoreFn:
    """Return a scorer giving every user the item ``popularity`` (n_items,) as scores."""
    popularity = np.asarray(popularity, dtype=np.float32)

    def score(users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(popularity, (len(users), len(popularity)))  # (B, I)

    return score


def ease_weights(train: sp.csr_matrix, config: EaseConfig) -> np.ndarray:
    """Return EASE's float32 ``(I, I)`` item-item matrix B (zero diagonal) for binary ``train``.

    B = I - P diag(1 / diag(P)) with P = (X^T X + l2 I)^-1 (Steck, 2019).
    """
    x = sp.csr_matrix(train, dtype=np.float64)
    gram = (x.T @ x).toarray()  # (I, I)
    gram[np.diag_indices_from(gram)] += config.l2
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


def ease_scorer(train: sp.csr_matrix, weights: np.ndarray) -> ScoreFn:
    """Return a scorer: the users' training rows times B."""
    x = sp.csr_matrix(train, dtype=np.float32)

    def score(users: np.ndarray) -> np.ndarray:
        return np.asarray(x[users] @ weights)  # (B, I)

    return score


def evaluate_split(score_fn: ScoreFn, split: Split, ks: Iterable[int] = (10,)) -> dict:
    """Return ``{"valid": metrics, "test": metrics, "test_seconds": s}`` of one scorer.

    Validation excludes training items; test excludes training and validation items.
    ``test_seconds`` is the wall time of the test evaluation (scoring, ranking, metrics).
    """
    ks = tuple(ks)
    valid = evaluate_full_ranking(score_fn, split.valid_matrix(), split.seen_for_valid(), ks)
    truth, seen = split.test_matrix(), split.seen_for_test()
    start = time.perf_counter()
    test = evaluate_full_ranking(score_fn, truth, seen, ks)
    return {"valid": valid, "test": test, "test_seconds": time.perf_counter() - start}


def evaluate_most_popular(split: Split, ks: Iterable[int] = (10,)) -> dict:
    """Return :func:`evaluate_split` of the most-popular baseline (train counts only)."""
    scorer = most_popular_scorer(item_popularity(split.train, split.n_items))
    return evaluate_split(scorer, split, ks)


def tune_ease(
    split: Split,
    l2_grid: Iterable[float] = (100.0, 250.0, 500.0, 1000.0),
    ks: Iterable[int] = (10,),
    select: str = "ndcg@10",
) -> tuple[EaseConfig, dict, dict[float, float]]:
    """Return the config with the best validation ``select``, its results, and every trial.

    Only validation picks ``l2``; the returned results hold the test numbers of that one.
    """
    ks = tuple(ks)
    train = split.train_matrix()
    trials: dict[float, float] = {}
    best: tuple[float, EaseConfig, np.ndarray] | None = None
    for l2 in l2_grid:
        config = EaseConfig(l2=float(l2))
        weights = ease_weights(train, config)
        valid = evaluate_full_ranking(
            ease_scorer(train, weights), split.valid_matrix(), split.seen_for_valid(), ks
        )
        trials[config.l2] = valid[select]
        if best is None or valid[select] > best[0]:
            best = (valid[select], config, weights)
    if best is None:
        raise ValueError("l2_grid is empty")
    _, config, weights = best
    return config, evaluate_split(ease_scorer(train, weights), split, ks), trials
