"""Whole-pipeline evaluation: retrieve N candidates, rank them, score the top k on the protocol.

Unlike :func:`slimrank.evaluation.protocol.evaluate_full_ranking`, which ranks every item, here
only the retrieved candidates can be recommended, so retrieval recall bounds the result. Users
and metrics follow the protocol: every user with at least one relevant item counts (an empty
candidate list scores 0), and :func:`slimrank.evaluation.metrics.ranking_metrics` averages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
import scipy.sparse as sp

from slimrank.evaluation.metrics import per_user_metrics, ranking_metrics
from slimrank.evaluation.paired import PerUser
from slimrank.ranking.candidates import Candidates, SearchFn, label_candidates, mine_candidates
from slimrank.ranking.features import CandidateFeatures, FeatureTables, candidate_features

# Scores of candidates from their features: CandidateFeatures -> (U, N).
RankFn = Callable[[CandidateFeatures], np.ndarray]


def rank_candidates(items: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Return the (U, k) best-scored items of each row, ``-1`` padded.

    Pads (item ``-1``) never rank; ties keep retrieval order (the candidates' column order).
    """
    if items.shape != scores.shape:
        raise ValueError(f"items {items.shape} and scores {scores.shape} differ")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    s = np.where(items >= 0, scores.astype(np.float64), -np.inf)  # (U, N)
    k_eff = min(k, items.shape[1])
    order = np.argsort(-s, axis=1, kind="stable")[:, :k_eff]  # (U, k_eff)
    top = np.take_along_axis(items, order, axis=1)
    top = np.where(np.take_along_axis(s, order, axis=1) == -np.inf, -1, top)
    if k_eff < k:
        top = np.pad(top, ((0, 0), (0, k - k_eff)), constant_values=-1)
    return top


def pipeline_metrics(
    cands: Candidates, scores: np.ndarray, truth: sp.csr_matrix, ks: Iterable[int] = (10,)
) -> dict[str, float]:
    """Return the protocol's metrics of ranking ``cands`` by ``scores`` against ``truth``.

    ``truth`` is ``(n_users, n_items)``; rows are ``cands.user``. Also reports
    ``candidate_recall`` (the share of relevant items retrieved: the ceiling of recall).
    """
    ks = tuple(ks)
    rows = sp.csr_matrix(truth)[cands.user]  # (U, I)
    top = rank_candidates(cands.items, scores, max(ks))
    out = ranking_metrics(top, rows, ks)
    n_rel = np.diff(rows.indptr)
    keep = n_rel > 0
    found = label_candidates(cands, truth).sum(axis=1)
    out["candidate_recall"] = float((found[keep] / n_rel[keep]).mean()) if keep.any() else 0.0
    out["users"] = float(keep.sum())
    return out


def pipeline_per_user(
    cands: Candidates, scores: np.ndarray, truth: sp.csr_matrix, k: int = 10
) -> PerUser:
    """Return each evaluated user's NDCG@k of ranking ``cands`` by ``scores`` (for pairing).

    The users are ``cands.user`` with at least one relevant item, the ones
    :func:`pipeline_metrics` averages over, so the mean is its ``ndcg@k``.
    """
    rows = sp.csr_matrix(truth)[cands.user]  # (U, I)
    top = rank_candidates(cands.items, scores, k)
    keep = np.diff(rows.indptr) > 0
    return PerUser(np.asarray(cands.user)[keep], per_user_metrics(top, rows, k)["ndcg"])


@dataclasses.dataclass(frozen=True)
class PipelineView:
    """Candidates and features of the evaluated users, mined once, with their truth."""

    cands: Candidates
    feats: CandidateFeatures
    truth: sp.csr_matrix  # (n_users, n_items)

    def evaluate(self, rank_fn: RankFn, ks: Iterable[int] = (10,)) -> dict[str, float]:
        """Return the pipeline metrics of ranking the candidates with ``rank_fn``."""
        return pipeline_metrics(self.cands, rank_fn(self.feats), self.truth, ks)

    def retrieval_only(self, ks: Iterable[int] = (10,)) -> dict[str, float]:
        """Return the metrics of keeping the retrieval order (the no-ranker baseline)."""
        return pipeline_metrics(self.cands, self.cands.retrieval_score, self.truth, ks)


def pipeline_view(
    search: SearchFn,
    user_vecs: np.ndarray,
    tables: FeatureTables,
    truth: sp.csr_matrix,
    exclude: sp.csr_matrix,
    n: int = 200,
) -> PipelineView:
    """Return the view of users with a relevant item in ``truth``: retrieve ``n``, featurize.

    ``exclude`` is what users already have (training items when validating; training and
    validation items when testing); ``tables`` is built from the training matrix.
    """
    truth = sp.csr_matrix(truth)
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    cands = mine_candidates(user_vecs, search, users, n, exclude)
    return PipelineView(cands, candidate_features(tables, cands), truth)
