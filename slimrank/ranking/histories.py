"""Users' interaction histories, most recent first, as one flat ragged array.

Candidate features read a user's history through :class:`Histories`: row ``u`` is
``items[indptr[u]:indptr[u + 1]]``, the most recent item first, so a capped read
(:meth:`Histories.recent`) is a slice whose cost does not depend on how long the history is.
The same arrays serve the exclusion of already-seen items (order does not matter there) and,
as a binary matrix (:meth:`Histories.matrix`), the offline builds of the item-item tables.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

from slimrank.ranking.candidates import pair_lookup


@dataclasses.dataclass(frozen=True)
class Histories:
    """``n_rows`` histories over ``n_items`` items; each row distinct items, newest first."""

    indptr: np.ndarray  # (n_rows + 1,) int64
    items: np.ndarray  # (nnz,) int64 item rows
    n_items: int

    def __post_init__(self) -> None:
        indptr = np.asarray(self.indptr, dtype=np.int64)
        items = np.asarray(self.items, dtype=np.int64)
        if indptr.ndim != 1 or len(indptr) < 1 or indptr[0] != 0 or indptr[-1] != len(items):
            raise ValueError(f"Histories: indptr must run from 0 to {len(items)} items")
        if np.any(np.diff(indptr) < 0):
            raise ValueError("Histories: indptr must not decrease")
        if len(items) and (items.min() < 0 or items.max() >= self.n_items):
            raise ValueError(f"Histories: item rows must lie in [0, {self.n_items})")
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "items", items)

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Return the ``(n_rows,)`` int64 history lengths."""
        return np.diff(self.indptr)

    def row(self, u: int) -> np.ndarray:
        """Return user ``u``'s whole history, newest first."""
        return self.items[self.indptr[u] : self.indptr[u + 1]]

    def recent(self, rows: np.ndarray, cap: int) -> Histories:
        """Return the histories of ``rows`` (in that order) cut to their ``cap`` newest items.

        ``cap = 0`` keeps every item. Cost: the items kept, not the histories' lengths.
        """
        rows = np.asarray(rows, dtype=np.int64)
        outside = rows[(rows < 0) | (rows >= self.n_rows)]
        if outside.size:  # a negative row would read another row's items
            raise IndexError(f"row {outside[0]} is outside [0, {self.n_rows})")
        if rows.shape == (1,):  # one request's user: a slice, without the ragged gather
            start, end = int(self.indptr[rows[0]]), int(self.indptr[rows[0] + 1])
            if cap > 0:
                end = min(end, start + cap)
            indptr = np.array([0, end - start], dtype=np.int64)
            return self._trusted(indptr, self.items[start:end].copy())
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        if cap > 0:
            lengths = np.minimum(lengths, cap)
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        return self._trusted(indptr, self.items[ragged_positions(starts, lengths)])

    def _trusted(self, indptr: np.ndarray, items: np.ndarray) -> Histories:
        """Return rows cut from this (already checked) one without checking them again."""
        out = object.__new__(Histories)
        object.__setattr__(out, "indptr", indptr)
        object.__setattr__(out, "items", items)
        object.__setattr__(out, "n_items", self.n_items)
        return out

    def matrix(self) -> sp.csr_matrix:
        """Return the binary ``(n_rows, n_items)`` float32 matrix, indices sorted."""
        ones = np.ones(len(self.items), dtype=np.float32)
        m = sp.csr_matrix((ones, self.items, self.indptr), shape=(self.n_rows, self.n_items))
        m = m.sorted_indices()
        return m

    @classmethod
    def from_items(cls, items: np.ndarray, n_items: int) -> Histories:
        """Return one history from ``items`` given oldest first (repeats keep the last)."""
        items = np.asarray(items, dtype=np.int64)[::-1]  # newest first
        _, first = np.unique(items, return_index=True)
        kept = items[np.sort(first)]
        return cls(np.array([0, len(kept)]), kept, n_items)

    @classmethod
    def from_matrix(cls, observed: sp.spmatrix, time: sp.spmatrix | None = None) -> Histories:
        """Return the histories of the non-zeros of ``observed`` ``(U, I)``, newest first.

        ``time`` (same shape; e.g. :func:`latest_times`) orders each row, newest first, ties
        and items it lacks by item row; without it rows are in item-row order.
        """
        m = sp.csr_matrix(observed, dtype=np.float32)
        m.sum_duplicates()
        m.eliminate_zeros()
        m.sort_indices()
        n_rows = m.shape[0]
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(m.indptr))
        cols = m.indices.astype(np.int64)
        stamp = np.zeros(len(cols), dtype=np.float64)
        if time is not None:
            stamp = pair_lookup(sp.csr_matrix(time, dtype=np.float64), rows, cols)
        order = np.lexsort((cols, -stamp, rows))  # by row, newest first, then item row
        return cls(m.indptr.astype(np.int64), cols[order], m.shape[1])


def latest_times(
    user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, shape: tuple[int, int]
) -> sp.csr_matrix:
    """Return the ``(U, I)`` matrix of each (user, item)'s latest timestamp, as float64."""
    key = np.asarray(user, np.int64) * shape[1] + np.asarray(item, np.int64)
    order = np.lexsort((np.asarray(timestamp, np.int64), key))
    key, stamp = key[order], np.asarray(timestamp, np.float64)[order]
    last = np.ones(len(key), dtype=bool)
    last[:-1] = key[1:] != key[:-1]
    rows, cols = np.divmod(key[last], shape[1])
    return sp.csr_matrix((stamp[last], (rows, cols)), shape=shape)


def ragged_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Return ``concat(arange(s, s + n) for s, n in zip(starts, lengths))`` without a loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths  # (R,) where each run starts in the output
    return np.repeat(np.asarray(starts, np.int64) - offsets, lengths) + np.arange(total)
