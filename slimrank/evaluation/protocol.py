"""The evaluation protocol shared by every stage (DESIGN.md, RecBole's full ranking).

Full ranking over all items minus the items the user already has (training items when
validating; training and validation items when testing), metrics averaged over the users with
at least one item in the evaluated part. Ties in score are broken by the lower item index, so a
ranking, and every metric computed from it, does not depend on how the scorer orders equal
scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import scipy.sparse as sp

from slimrank.evaluation.metrics import ranking_metrics

# Scores for a batch of user indices: (B,) -> (B, n_items).
ScoreFn = Callable[[np.ndarray], np.ndarray]


# Items per block when bounding a row's k-th best score (see topk_items).
TOPK_BLOCK = 128


def topk_items(
    scores: np.ndarray, k: int, exclude: sp.csr_matrix | None = None, block: int = TOPK_BLOCK
) -> np.ndarray:
    """Return the ``(B, k)`` indices of the top-``k`` scores per row, best first.

    ``exclude`` (``(B, n_items)``) marks items that may not be ranked. Rows with fewer than
    ``k`` rankable items are padded with ``-1``. Ties go to the lower item index.
    ``block``: the most items per block of the pre-selection below (any value gives the
    same result).
    """
    scores = np.asarray(scores)
    # Float32 stays float32 (no arithmetic is done on the scores, only comparisons).
    scores = np.array(scores, dtype=np.result_type(scores.dtype, np.float32), copy=True)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (batch, items), got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n_rows, n_items = scores.shape
    if exclude is not None:
        exclude = sp.csr_matrix(exclude)
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude shape {exclude.shape} != scores shape {scores.shape}")
        rows = np.repeat(np.arange(n_rows), np.diff(exclude.indptr))
        scores[rows, exclude.indices] = -np.inf
    k_eff = min(k, n_items)
    if k_eff == 0 or n_rows == 0:
        return np.full((n_rows, k), -1, dtype=np.int64)
    # Sorting every item is O(I log I) a row, and even a partition of every row was most of a
    # 1M-item evaluation. Each row's items are cut into blocks: the k-th best of the blocks'
    # maxima is at most the row's k-th best score (k blocks each hold an item that high), so
    # the items at or above it, in the blocks whose maximum reaches it, hold the top k with all
    # their ties. Those few are sorted by score, ties to the lower item index, as a stable
    # sort of the whole row would.
    # Blocks small enough that there are at least k of them (a tiny catalog: one item each).
    width = max(1, min(int(block), n_items // k_eff))
    starts = np.arange(0, n_items, width)
    maxima = np.maximum.reduceat(scores, starts, axis=1)  # (B, blocks)
    bound = np.partition(maxima, len(starts) - k_eff, axis=1)[:, len(starts) - k_eff]
    hit_row, hit_block = np.nonzero(maxima >= bound[:, None])  # row-major
    cols = starts[hit_block][:, None] + np.arange(width)  # (H, width)
    rows = np.broadcast_to(hit_row[:, None], cols.shape)
    inside = cols < n_items
    rows, cols = rows[inside], cols[inside]  # row-major: rows, then items, ascending
    values = scores[rows, cols]
    keep = values >= bound[rows]
    rows, cols, values = rows[keep], cols[keep], values[keep]
    order = np.lexsort((cols, -values, rows))
    first = np.searchsorted(rows[order], np.arange(n_rows))  # each row has >= k_eff kept
    take = order[first[:, None] + np.arange(k_eff)]  # (B, k_eff)
    top = np.where(values[take] == -np.inf, -1, cols[take])
    if k_eff < k:
        top = np.pad(top, ((0, 0), (0, k - k_eff)), constant_values=-1)
    return top


def rank_users(
    score_fn: ScoreFn,
    users: np.ndarray,
    exclude: sp.csr_matrix,
    k: int,
    batch_size: int = 0,
) -> np.ndarray:
    """Return the ``(len(users), k)`` top-k items for ``users``, excluding ``exclude[users]``.

    ``batch_size`` users are scored at once (0: as many as fit :data:`SCORE_BLOCK` scores, at
    most 1,024).
    """
    exclude = sp.csr_matrix(exclude)
    if batch_size <= 0:
        batch_size = score_batch(exclude.shape[1])
    parts = []
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        scores = np.asarray(score_fn(batch))
        if scores.shape != (len(batch), exclude.shape[1]):
            raise ValueError(
                f"score_fn returned shape {scores.shape}, expected {(len(batch), exclude.shape[1])}"
            )
        parts.append(topk_items(scores, k, exclude[batch]))
    return np.concatenate(parts) if parts else np.empty((0, k), dtype=np.int64)


# Scores held at once when ranking every item: 2^24 float32 (64 MiB). A fixed 1,024-user batch
# would hold a 4 GiB (1024, 1M) block on a million-item catalog.
SCORE_BLOCK = 1 << 24


def score_batch(n_items: int) -> int:
    """Return how many users' scores of ``n_items`` items fit :data:`SCORE_BLOCK` (1-1,024)."""
    return int(np.clip(SCORE_BLOCK // max(n_items, 1), 1, 1024))


def evaluated_users(truth: sp.spmatrix, max_users: int = 0, seed: int = 0) -> np.ndarray:
    """Return the users :func:`evaluate_full_ranking` ranks: those with a relevant item in
    ``truth``, or (``max_users`` > 0) a seeded sample of that many of them, sorted."""
    users = np.flatnonzero(np.diff(sp.csr_matrix(truth).indptr) > 0)
    if 0 < max_users < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return users


def evaluate_full_ranking(
    score_fn: ScoreFn,
    truth: sp.csr_matrix,
    exclude: sp.csr_matrix,
    ks: Iterable[int] = (10,),
    batch_size: int = 0,
    max_users: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Return metrics of ``score_fn`` ranking all items for users with a relevant item.

    ``truth`` holds the evaluated part (validation or test) and ``exclude`` the items the user
    already has (training, or training plus validation), both ``(n_users, n_items)``.
    ``batch_size`` users are scored at once (0: as many as fit :data:`SCORE_BLOCK` scores, at
    most 1,024); ``max_users`` > 0 evaluates a seeded random sample of that many users.
    """
    ks = tuple(ks)
    truth = sp.csr_matrix(truth)
    users = evaluated_users(truth, max_users, seed)
    if batch_size <= 0:
        batch_size = score_batch(truth.shape[1])
    top = rank_users(score_fn, users, exclude, max(ks), batch_size)
    metrics = ranking_metrics(top, truth[users], ks)
    metrics["users"] = float(len(users))
    return metrics
