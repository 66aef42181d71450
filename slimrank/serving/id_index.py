"""String id -> row lookups held in numpy arrays: a sorted copy of the ids searched by bisection.

A snapshot maps a request's user and item ids to table rows. A ``dict`` of a million ids holds
a million ``str`` objects: building it takes a second of Python, its resizes and its
deallocation each hold the GIL for tens of milliseconds at a time, and a server that reloads
a bundle on a thread stalls its event loop for that long. :class:`IdIndex` holds the ids in
three arrays instead (built with numpy's sort, which releases the GIL; freed at once): a
lookup is a binary search, a few microseconds for one id.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np


class IdIndex(Mapping[str, int]):
    """Each id of an ``(n,)`` unicode array -> its row; a read-only mapping.

    ``ValueError`` if the ids are not a 1-d unicode array or are not unique.
    """

    __slots__ = ("_order", "_sorted", "ids")

    def __init__(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.dtype.kind != "U" and ids.size):
            raise ValueError(f"ids must be a 1-d unicode array, not {ids.dtype} {ids.shape}")
        ids = ids.astype(str, copy=False)
        order = np.argsort(ids, kind="stable")  # (n,) rows in id order
        ordered = ids[order]  # (n,)
        if len(ordered) > 1 and bool((ordered[1:] == ordered[:-1]).any()):
            raise ValueError("ids are not unique")
        self.ids = ids
        self._order = order.astype(np.int64, copy=False)
        self._sorted = ordered

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """Return the ``(m,)`` int64 rows of ``keys``, -1 for an id not held."""
        if not len(keys):
            return np.empty(0, dtype=np.int64)
        query = np.asarray(keys, dtype=str)  # (m,)
        found = self._found(query)
        rows = np.full(len(query), -1, dtype=np.int64)
        rows[found[0]] = self._order[found[1]]
        if any("\x00" in key for key in keys):
            # numpy drops trailing NULs ("a\x00" would match "a"); a held id never ends in one.
            rows[[key.endswith("\x00") for key in keys]] = -1
        return rows

    def _found(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in ``query`` of the ids held, and their positions in the sorted ids."""
        if not len(self._sorted):
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        at = np.searchsorted(self._sorted, query)  # (m,) insertion points
        at = np.minimum(at, len(self._sorted) - 1)
        hit = np.flatnonzero(self._sorted[at] == query)
        return hit, at[hit]

    def row(self, key: str) -> int:
        """Return the row of id ``key``, -1 if it is not held."""
        if not len(self._sorted) or key.endswith("\x00"):
            return -1
        at = int(np.searchsorted(self._sorted, key))
        if at < len(self._sorted) and self._sorted[at] == key:
            return int(self._order[at])
        return -1

    def __getitem__(self, key: str) -> int:
        row = self.row(key) if isinstance(key, str) else -1
        if row < 0:
            raise KeyError(key)
        return row

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.row(key) >= 0

    def __iter__(self) -> Iterator[str]:
        return (str(i) for i in self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"IdIndex({len(self)} ids)"
