"""Top-K ranking metrics (RecBole's definitions) and AUC, computed on arrays.

A ranking is a ``(U, K)`` integer array of item indices, best first, ``-1`` where a user has
fewer than K ranked items. Ground truth is a ``(U, I)`` sparse matrix whose non-zeros are the
relevant items. Every function is vectorized over users; nothing loops in Python per user.

Definitions, per user with ``n`` relevant items and hits ``h_1..h_K`` (1 where the item at
rank ``r`` is relevant):

- Recall@K    = sum(h) / n
- Precision@K = sum(h) / K
- Hit@K       = 1 if sum(h) > 0
- MRR@K       = 1 / r of the first hit, 0 if none
- NDCG@K      = sum(h_r / log2(r + 1)) / sum_{r <= min(n, K)} 1 / log2(r + 1)

Users with no relevant item are left out of the averages (the protocol of DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

METRICS = ("recall", "ndcg", "mrr", "hit", "precision")


def hit_matrix(topk: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """Return a ``(U, K)`` bool array: is ``topk[u, r]`` a relevant item of user ``u``."""
    topk = np.asarray(topk)
    if topk.ndim != 2:
        raise ValueError(f"topk must be 2-D (users, K), got shape {topk.shape}")
    truth = sp.csr_matrix(truth)
    n_users, n_items = truth.shape
    if topk.shape[0] != n_users:
        raise ValueError(f"topk has {topk.shape[0]} rows but truth has {n_users} users")
    if topk.size and (topk.max() >= n_items or topk.min() < -1):
        raise ValueError(f"topk holds item indices outside [-1, {n_items})")
    truth.sum_duplicates()
    truth.sort_indices()
    rows = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(truth.indptr))
    # One sorted key per relevant (user, item) pair; a hit is a key found by binary search.
    keys = rows * n_items + truth.indices.astype(np.int64)
    keys = keys[truth.data != 0]
    query = np.arange(n_users, dtype=np.int64)[:, None] * n_items + topk.astype(np.int64)
    pos = np.searchsorted(keys, query)
    found = keys[np.minimum(pos, max(len(keys) - 1, 0))] == query if len(keys) else query < 0
    return found & (topk >= 0)


def per_user_metrics(topk: np.ndarray, truth: sp.csr_matrix, k: int) -> dict[str, np.ndarray]:
    """Return each metric at ``k`` per user, over the users with at least one relevant item."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    topk = np.asarray(topk)
    if topk.shape[1] < k:
        raise ValueError(f"k={k} but the ranking has only {topk.shape[1]} columns")
    hits = hit_matrix(topk[:, :k], truth)  # (U, k)
    n_relevant = np.diff(sp.csr_matrix(truth).indptr)
    keep = n_relevant > 0
    hits, n_relevant = hits[keep], n_relevant[keep]
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # (k,)
    ideal = np.cumsum(discount)[np.minimum(n_relevant, k) - 1]
    n_hits = hits.sum(axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)
    return {
        "recall": n_hits / n_relevant,
        "precision": n_hits / k,
        "hit": (n_hits > 0).astype(np.float64),
        "mrr": np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0),
        "ndcg": (hits * discount).sum(axis=1) / ideal,
    }


def ranking_metrics(
    topk: np.ndarray, truth: sp.csr_matrix, ks: Iterable[int] = (10,)
) -> dict[str, float]:
    """Return ``{"ndcg@10": ..., "recall@10": ...}``: each metric averaged over users."""
    out: dict[str, float] = {}
    for k in ks:
        per_user = per_user_metrics(topk, truth, k)
        for name in METRICS:
            values = per_user[name]
            out[f"{name}@{k}"] = float(values.mean()) if len(values) else float("nan")
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the ROC AUC of ``scores`` for binary ``labels``; tied scores count one half."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal 1-D")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative label")
    ranks = rankdata(scores)  # average ranks: ties contribute 1/2
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the mean per-group AUC over groups (e.g. users) that have both label values."""
    groups = np.asarray(groups)
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if not (groups.shape == labels.shape == scores.shape) or groups.ndim != 1:
        raise ValueError("groups, labels and scores must be 1-D arrays of one length")
    _, group_code = np.unique(groups, return_inverse=True)
    # Dense codes ordered by (group, score): their average ranks are the within-group ranks
    # (ties averaged) shifted by the number of rows in earlier groups.
    _, key = np.unique(np.c_[group_code, scores], axis=0, return_inverse=True)
    ranks = rankdata(key.ravel())
    n_all = np.bincount(group_code)
    offset = np.r_[0, np.cumsum(n_all)[:-1]]
    local = ranks - offset[group_code]
    n_pos = np.bincount(group_code, weights=labels)
    n_neg = n_all - n_pos
    rank_sum = np.bincount(group_code, weights=local * labels)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        raise ValueError("no group has both a positive and a negative label")
    values = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return float(values.mean())
