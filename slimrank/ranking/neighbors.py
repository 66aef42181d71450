"""Top-K item-item neighbour tables: built offline with sparse operations, read per request.

A :class:`NeighborTable` keeps, for each item ``h``, its ``K`` strongest weights ``W[h, c]``.
:func:`history_signals` sums (and maxes) ``W[h, c]`` over a user's history items ``h`` for
each candidate ``c`` by gathering the neighbour lists of the history items and matching them
against the candidates: its cost is ``history items x K`` plus the candidates, whatever the
number of users or items.

Two tables are built here:

- :func:`cooccurrence_table`: cosine co-occurrence ``|users(h) & users(c)| / sqrt(|users(h)|
  |users(c)|)``, computed in blocks of items (``X[:, block]^T X``) so that memory follows
  the block, not ``I x I``;
- :func:`ease_table`: EASE's item-item weights (Steck 2019). ``exact`` inverts the dense
  ``(I, I)`` Gram matrix (small catalogs); ``local`` solves, for each item ``j``, EASE's ridge
  regression restricted to ``j``'s ``local_neighbors`` strongest co-occurring items, reading
  the pair counts from the co-occurrence table (pairs it does not hold count as 0). Both keep
  the ``K`` largest weights by magnitude per row.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import numpy as np
import scipy.sparse as sp

from slimrank.evaluation.baselines import EaseConfig, ease_weights
from slimrank.ranking.histories import Histories, ragged_positions

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NeighborTable:
    """Row ``h``: ``indices[indptr[h]:indptr[h + 1]]`` with ``values``, strongest first."""

    indptr: np.ndarray  # (I + 1,) int64
    indices: np.ndarray  # (nnz,) int64 item rows
    values: np.ndarray  # (nnz,) float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "indptr", np.asarray(self.indptr, dtype=np.int64))
        object.__setattr__(self, "indices", np.asarray(self.indices, dtype=np.int64))
        object.__setattr__(self, "values", np.asarray(self.values, dtype=np.float32))
        if len(self.indices) != len(self.values) or self.indptr[-1] != len(self.indices):
            raise ValueError("NeighborTable: indptr, indices and values do not agree")

    @property
    def n_items(self) -> int:
        return len(self.indptr) - 1

    def to_csr(self) -> sp.csr_matrix:
        """Return the ``(I, I)`` float32 matrix the table holds (absent weights 0)."""
        shape = (self.n_items, self.n_items)
        m = sp.csr_matrix((self.values, self.indices, self.indptr), shape=shape)
        return m.sorted_indices()

    @classmethod
    def from_csr(cls, matrix: sp.spmatrix, k: int, by_magnitude: bool = False) -> NeighborTable:
        """Return the ``k`` largest entries of each row (by ``|w|`` if ``by_magnitude``).

        ``k = 0`` keeps every stored entry. Explicit zeros are dropped; ties keep the lower
        item row.
        """
        m = sp.csr_matrix(matrix, dtype=np.float32)
        m.sum_duplicates()
        m.eliminate_zeros()
        rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
        key = np.abs(m.data) if by_magnitude else m.data
        order = np.lexsort((m.indices, -key, rows))  # by row, strongest first
        rank = np.arange(m.nnz) - np.repeat(m.indptr[:-1], np.diff(m.indptr))
        keep = order[rank < k] if k > 0 else order
        counts = np.bincount(rows[keep], minlength=m.shape[0])
        indptr = np.concatenate([[0], np.cumsum(counts)])
        return cls(indptr, m.indices[keep].astype(np.int64), m.data[keep])


class _Slots(threading.local):
    """Per thread: an ``(I,)`` int64 array, -1 everywhere except while one row is matched."""

    array: np.ndarray | None = None

    def get(self, n_items: int) -> np.ndarray:
        if self.array is None or len(self.array) < n_items:
            self.array = np.full(n_items, -1, dtype=np.int64)
        return self.array


_SLOTS = _Slots()


def history_signals(
    history: Histories, table: NeighborTable, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(sum, max)``, each ``(U, N)`` float32, of ``W[h, items[u, n]]`` over the
    items ``h`` of history row ``u`` (a row's candidates are distinct, as retrieval gives them).

    Weights the table does not hold count as 0 (so the max is at least 0 unless every
    history item holds a weight for the candidate); an empty history and pads (``-1``) give
    0. Per row: the candidates are written into a per-thread slot array indexed by item (so
    a neighbour entry finds its candidate in one read), the history items' neighbour lists
    are gathered and matched, and the slots are cleared again; the cost is the history times
    ``K`` plus the candidates, whatever the catalog's size.
    """
    items = np.asarray(items, dtype=np.int64)
    n_users, n = items.shape
    if history.n_rows != n_users:
        raise ValueError(f"{history.n_rows} histories for {n_users} candidate rows")
    total = np.zeros((n_users, n), dtype=np.float32)
    best = np.zeros((n_users, n), dtype=np.float32)
    slots = _SLOTS.get(table.n_items)
    row_len = np.diff(table.indptr)
    for u in range(n_users):
        hist = history.items[history.indptr[u] : history.indptr[u + 1]]
        if not len(hist):
            continue
        cand = items[u]
        real = np.flatnonzero(cand >= 0)
        slots[cand[real]] = real
        try:
            lens = row_len[hist]
            pos = ragged_positions(table.indptr[hist], lens)
            at = slots[table.indices[pos]]
        finally:
            slots[cand[real]] = -1
        hit = np.flatnonzero(at >= 0)  # few of the gathered entries are candidates
        at, weight = at[hit], table.values[pos[hit]]
        total[u] = np.bincount(at, weights=weight, minlength=n)
        m = np.full(n, -np.inf, dtype=np.float32)
        np.maximum.at(m, at, weight)
        count = np.bincount(at, minlength=n)
        m = np.where(count < len(hist), np.maximum(m, 0.0), m)  # an absent weight counts 0
        best[u] = np.where(count == 0, 0.0, m)
    return total, best


def _item_blocks(cost: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Return consecutive ``[a, b)`` blocks whose summed ``cost`` stays within ``budget``."""
    blocks, a, n = [], 0, len(cost)
    cum = np.cumsum(cost)
    while a < n:
        base = cum[a - 1] if a else 0
        b = max(a + 1, int(np.searchsorted(cum, base + budget, side="right")))
        blocks.append((a, min(b, n)))
        a = b
    return blocks


def cooccurrence_table(
    observed: sp.spmatrix, k: int, block_pairs: int = 20_000_000
) -> NeighborTable:
    """Return the ``k`` strongest cosine co-occurrences of each item (diagonal excluded).

    ``observed`` is the binary ``(U, I)`` interaction matrix. Items go in blocks whose
    co-occurrence products hold about ``block_pairs`` entries at most.
    """
    x = sp.csr_matrix(observed, dtype=np.float32)
    x.data[:] = 1.0
    xt = sp.csr_matrix(x.T)  # (I, U)
    counts = np.asarray(x.sum(axis=0)).ravel()
    inv = (1.0 / np.sqrt(np.maximum(counts, 1.0))).astype(np.float32)
    cost = xt @ np.diff(x.indptr).astype(np.float64)  # (I,) bound on each row's products
    parts: list[NeighborTable] = []
    for a, b in _item_blocks(cost, block_pairs):
        c = sp.csr_matrix(xt[a:b] @ x)  # (b - a, I) counts
        c = sp.csr_matrix(sp.diags(inv[a:b]) @ c @ sp.diags(inv))
        own = np.repeat(np.arange(a, b), np.diff(c.indptr))  # row r is item a + r
        c.data[c.indices == own] = 0.0  # not one's own neighbour
        parts.append(NeighborTable.from_csr(c, k))
    return _stack(parts)


def _stack(parts: list[NeighborTable]) -> NeighborTable:
    """Return the row blocks in ``parts`` as one table."""
    if not parts:
        return NeighborTable(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0))
    counts = np.concatenate([np.diff(p.indptr) for p in parts])
    return NeighborTable(
        np.concatenate([[0], np.cumsum(counts)]),
        np.concatenate([p.indices for p in parts]),
        np.concatenate([p.values for p in parts]),
    )


def ease_exact_table(observed: sp.spmatrix, l2: float, k: int) -> NeighborTable:
    """Return EASE's weights ``B`` (dense inverse of the ``(I, I)`` Gram matrix), top ``k``
    by magnitude per row."""
    weights = ease_weights(sp.csr_matrix(observed), EaseConfig(l2=l2))  # (I, I)
    return NeighborTable.from_csr(sp.csr_matrix(weights), k, by_magnitude=True)


def ease_local_table(
    observed: sp.spmatrix,
    cooc: NeighborTable,
    l2: float,
    k: int,
    local_neighbors: int,
    chunk: int = 1024,
) -> NeighborTable:
    """Return EASE-like weights from per-item ridge regressions over small neighbourhoods.

    For each item ``j``, with ``S`` the ``local_neighbors`` first items of ``j``'s
    co-occurrence row, solve ``(G[S, S] + l2 I) b = G[S, j]`` with ``G = X^T X`` the pair
    counts, recovered from the cosine table (a pair held in neither item's first
    ``local_neighbors`` entries counts as 0); ``B[S, j] = b``. Over a full neighbourhood this
    is exactly EASE, whose column ``j`` is the ridge regression of item ``j`` on all the
    others. Then keep the ``k`` largest weights by magnitude per row. Work per item:
    ``local_neighbors ** 2`` gathered entries and one small solve, so it builds where the
    ``(I, I)`` inverse cannot.
    """
    x = sp.csr_matrix(observed)
    n_items = x.shape[1]
    counts = np.bincount(x.indices, minlength=n_items).astype(np.float64)
    root = np.sqrt(np.maximum(counts, 1.0))
    row_len = np.diff(cooc.indptr)
    lens = np.minimum(row_len, local_neighbors)
    rows_out, cols_out, vals_out = [], [], []
    for size in np.unique(lens[lens > 0]):
        targets = np.flatnonzero(lens == size)
        for start in range(0, len(targets), chunk):
            j = targets[start : start + chunk]  # (C,)
            c = len(j)
            at_j = cooc.indptr[j][:, None] + np.arange(size)[None, :]  # (C, S)
            s = cooc.indices[at_j]  # (C, S) each target's neighbourhood
            rhs = cooc.values[at_j] * root[s] * root[j][:, None]  # (C, S) counts G[s, j]
            # G[s_a, s_b]: the entries of row s_a that are in the same neighbourhood.
            member = (np.arange(c)[:, None] * n_items + s).ravel()  # (C * S,)
            order = np.argsort(member)
            member = member[order]
            a = s.ravel()
            # Only the first local_neighbors of each neighbour's own row are read: a pair
            # further down both rows counts as 0 (what the cosine table drops anyway).
            a_len = np.minimum(row_len[a], local_neighbors)
            pos = ragged_positions(cooc.indptr[a], a_len)
            owner = np.repeat(np.arange(c * size), a_len)  # (C * S) slot of a
            query = (owner // size) * n_items + cooc.indices[pos]
            at = np.minimum(np.searchsorted(member, query), len(member) - 1)
            hit = member[at] == query
            slot_a, slot_b = owner[hit], order[at[hit]]  # flat (target, position) slots
            b_items = cooc.indices[pos[hit]]
            gram = np.zeros((c, size, size), dtype=np.float64)
            t = slot_a // size
            gram[t, slot_a % size, slot_b % size] = (
                cooc.values[pos[hit]] * root[a[slot_a]] * root[b_items]
            )
            gram = np.maximum(gram, gram.transpose(0, 2, 1))  # a pair held in one row only
            diag = np.arange(size)
            gram[:, diag, diag] = counts[s] + l2
            weights = np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]  # (C, S)
            rows_out.append(s.ravel())
            cols_out.append(np.repeat(j, size))
            vals_out.append(weights.ravel())
    if not rows_out:
        empty = sp.csr_matrix((n_items, n_items), dtype=np.float32)
        return NeighborTable.from_csr(empty, k)
    b = sp.csr_matrix(
        (
            np.concatenate(vals_out).astype(np.float32),
            (np.concatenate(rows_out), np.concatenate(cols_out)),
        ),
        shape=(n_items, n_items),
    )
    return NeighborTable.from_csr(b, k, by_magnitude=True)
