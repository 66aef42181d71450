"""Candidate mining: the top-N retrieved items per user, their labels and training folds.

Leakage. A ranker trained on a user's *training* items as positives never sees them among the
candidates at evaluation time (they are excluded), and if the user vector, the co-occurrence
tables and the retrieval model were computed from all training items, every training item is
trivially "known". So training candidates come from a fold split (:func:`split_history`): each
user's training items are cut into a *history* fold (about 80 %: the only items that the user
vector, the feature tables and the exclusion see) and a *target* fold (about 20 %: the labels).
Retrieval and feature tables for the training candidates must be fitted on the history fold
only; at evaluation time the same code runs on the full training matrix, with the validation (or
test) items as labels. Retrieved items outside the target fold are the hard negatives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

# Nearest-neighbour search: (queries (B, d), k) -> (scores (B, k), item indices (B, k), -1 pads).
# A faiss index's ``search`` method fits, as does :func:`exact_search`.
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Retrieved candidates of ``U`` users, ``N`` per user, in retrieval order (best first).

    ``user``: int64 (U,); ``items``: int64 (U, N), ``-1`` pads a row with fewer than N items;
    ``retrieval_score``: float32 (U, N), 0 at pads.
    """

    user: np.ndarray
    items: np.ndarray
    retrieval_score: np.ndarray

    def __post_init__(self) -> None:
        user = np.asarray(self.user, dtype=np.int64)
        items = np.asarray(self.items, dtype=np.int64)
        score = np.asarray(self.retrieval_score, dtype=np.float32)
        if user.ndim != 1 or items.ndim != 2 or items.shape[0] != len(user):
            raise ValueError(f"user {user.shape} and items {items.shape} must be (U,), (U, N)")
        if score.shape != items.shape:
            raise ValueError(f"retrieval_score {score.shape} != items {items.shape}")
        object.__setattr__(self, "user", user)
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "retrieval_score", score)

    def __len__(self) -> int:
        return len(self.user)

    @property
    def n(self) -> int:
        """Candidates per user (the padded width N)."""
        return self.items.shape[1]

    @property
    def mask(self) -> np.ndarray:
        """Return the (U, N) bool array of real (not padded) candidates."""
        return self.items >= 0

    def take(self, rows: np.ndarray) -> Candidates:
        """Return the candidates of the selected rows (mask or indices)."""
        return Candidates(self.user[rows], self.items[rows], self.retrieval_score[rows])


def exact_search(item_vecs: np.ndarray) -> SearchFn:
    """Return a brute-force inner-product search over ``item_vecs`` (I, d); ties -> lower index."""
    item_vecs = np.ascontiguousarray(item_vecs, dtype=np.float32)

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.asarray(queries, dtype=np.float32) @ item_vecs.T  # (B, I)
        k_eff = min(k, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k_eff]  # (B, k_eff)
        top_scores = np.take_along_axis(scores, top, axis=1)
        if k_eff < k:
            pad = ((0, 0), (0, k - k_eff))
            top = np.pad(top, pad, constant_values=-1)
            top_scores = np.pad(top_scores, pad, constant_values=-np.inf)
        return top_scores, top.astype(np.int64)

    return search


def pair_lookup(matrix: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Return ``matrix[rows, cols]`` elementwise (0 where absent) for broadcastable int arrays.

    Vectorized by binary search over the sorted ``row * n_cols + col`` keys of the non-zeros;
    rows or columns outside the matrix (negative, or past its end) read 0.
    """
    matrix = sp.csr_matrix(matrix)
    if not matrix.has_sorted_indices:
        matrix = matrix.sorted_indices()
    n_rows, n_cols = matrix.shape
    rows, cols = np.broadcast_arrays(np.asarray(rows, np.int64), np.asarray(cols, np.int64))
    out = np.zeros(rows.shape, dtype=matrix.dtype)
    if matrix.nnz == 0:
        return out
    row_of = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(matrix.indptr))
    keys = row_of * n_cols + matrix.indices.astype(np.int64)  # sorted: csr is row-major
    # A column past the end would otherwise read the next row's first columns.
    valid = (rows >= 0) & (cols >= 0) & (rows < n_rows) & (cols < n_cols)
    query = np.where(valid, rows * n_cols + cols, -1)
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    found = valid & (keys[pos] == query)
    out[found] = matrix.data[pos[found]]
    return out


def mine_candidates(
    user_vecs: np.ndarray,
    search: SearchFn,
    users: np.ndarray,
    n: int = 200,
    exclude: sp.csr_matrix | None = None,
    batch_size: int = 1024,
) -> Candidates:
    """Return the top-``n`` retrieved items of each of ``users``, skipping ``exclude[user]``.

    ``user_vecs`` is indexed by user (``user_vecs[users]`` are the queries) and ``exclude`` is
    ``(n_users, n_items)``. The search asks for ``n`` plus the most excluded items of any user
    in the batch, so a row is only padded when the index cannot return enough items.
    """
    if n <= 0:
        raise ValueError(f"n={n}: must be positive")
    users = np.asarray(users, dtype=np.int64)
    user_vecs = np.asarray(user_vecs, dtype=np.float32)
    if exclude is not None:
        exclude = sp.csr_matrix(exclude)
    items_parts, score_parts = [], []
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        extra = 0
        if exclude is not None:
            extra = int(np.diff(exclude.indptr)[batch].max(initial=0))
        scores, idx = search(user_vecs[batch], n + extra)  # (B, K)
        idx = np.asarray(idx, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        keep = idx >= 0
        if exclude is not None:
            keep &= pair_lookup(exclude, batch[:, None], idx) == 0
        # Stable sort moves kept items to the front in retrieval order.
        order = np.argsort(~keep, axis=1, kind="stable")[:, :n]  # (B, n')
        idx = np.take_along_axis(idx, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        kept = np.take_along_axis(keep, order, axis=1)
        idx = np.where(kept, idx, -1)
        scores = np.where(kept, scores, 0.0).astype(np.float32)
        if idx.shape[1] < n:
            pad = ((0, 0), (0, n - idx.shape[1]))
            idx = np.pad(idx, pad, constant_values=-1)
            scores = np.pad(scores, pad, constant_values=0.0)
        items_parts.append(idx)
        score_parts.append(scores)
    if not items_parts:
        empty = np.zeros((0, n), dtype=np.int64)
        return Candidates(users, empty, empty.astype(np.float32))
    return Candidates(users, np.concatenate(items_parts), np.concatenate(score_parts))


def label_candidates(cands: Candidates, positives: sp.csr_matrix) -> np.ndarray:
    """Return float32 (U, N) labels: 1 where the candidate is in ``positives[user]``, else 0."""
    return (pair_lookup(positives, cands.user[:, None], cands.items) != 0).astype(np.float32)


def split_history(
    train: sp.csr_matrix, target_frac: float = 0.2, seed: int = 0
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Return ``(history, target)`` binary csr matrices that partition each user's ``train``.

    Each user with at least two items gives ``round(target_frac * n_u)`` of them (at least one,
    at most ``n_u - 1``), chosen at random, to the target fold; users with one item keep it in
    the history.
    """
    if not 0.0 < target_frac < 1.0:
        raise ValueError(f"target_frac={target_frac}: must lie in (0, 1)")
    train = sp.csr_matrix(train, dtype=np.float32)
    train.sum_duplicates()
    n_users, n_items = train.shape
    counts = np.diff(train.indptr)
    rows = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(train.nnz), rows))  # random order within each row
    rank = np.empty(train.nnz, dtype=np.int64)
    rank[order] = np.arange(train.nnz) - np.repeat(train.indptr[:-1], counts)
    n_target = np.clip(np.rint(target_frac * counts), 1, counts - 1)
    n_target = np.where(counts >= 2, n_target, 0).astype(np.int64)
    is_target = rank < n_target[rows]
    cols = train.indices.astype(np.int64)

    def part(sel: np.ndarray) -> sp.csr_matrix:
        data = np.ones(int(sel.sum()), dtype=np.float32)
        m = sp.csr_matrix((data, (rows[sel], cols[sel])), shape=(n_users, n_items))
        m.sort_indices()
        return m

    return part(~is_target), part(is_target)


def fold_item_history(
    history: sp.csr_matrix, target: sp.csr_matrix, users: np.ndarray
) -> sp.csr_matrix:
    """Return the training items a fold's item statistics may read: every user's, but for
    ``users`` (whose target fold labels the training lists) only their history fold.

    The served tables read every user's items; a fold's tables built from its history alone
    read ``1 - target_frac`` of them, and the rankers learn item-item features of another
    scale than the ones they are served. Users outside ``users`` label nothing, so their
    target fold leaks nothing.
    """
    keep = np.ones(target.shape[0], dtype=np.float32)
    keep[np.asarray(users, dtype=np.int64)] = 0.0
    others = sp.diags(keep).dot(sp.csr_matrix(target, dtype=np.float32))
    out = sp.csr_matrix(history, dtype=np.float32) + others
    out.eliminate_zeros()
    out.sort_indices()
    return sp.csr_matrix(out)
