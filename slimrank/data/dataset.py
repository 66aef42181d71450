"""The in-memory dataset: id maps, columnar interactions, feature tables and the split.

Everything downstream works on dense indices ``0..n-1``; :class:`IdMap` translates them to and
from the external ids of the logs. Arrays are columnar numpy, never per-row Python objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse as sp

UnknownMode = Literal["error", "drop", "minus_one"]


class IdMap:
    """External ids (str) <-> dense indices ``0..n-1``; index ``i`` is ``ids[i]``.

    pandas is imported by the methods that need it, not by this module: the server imports
    these classes (through the ranking features) and runs without pandas.
    """

    def __init__(self, ids: Iterable[object]) -> None:
        import pandas as pd

        ids = _as_strings(ids)  # (n,)
        lookup = pd.Index(ids)
        if not lookup.is_unique:
            dup = lookup[lookup.duplicated()][0]
            raise ValueError(f"IdMap ids must be unique, {dup!r} repeats")
        self.ids: np.ndarray = ids
        self._lookup = lookup

    @classmethod
    def from_ids(cls, ids: Iterable[object]) -> IdMap:
        """Return the map of the distinct ``ids`` in first-seen order (repeats collapse)."""
        import pandas as pd

        return cls(pd.unique(pd.Series(_as_strings(ids))))

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"IdMap(n={len(self)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and np.array_equal(self.ids, other.ids)

    __hash__ = None  # type: ignore[assignment]

    def index(
        self, external_ids: Iterable[object], *, unknown: UnknownMode = "error"
    ) -> np.ndarray:
        """Return the int64 dense indices of ``external_ids``.

        ``unknown``: ``"error"`` raises ``KeyError`` naming the first unknown id, ``"drop"``
        leaves unknown ids out (the result may be shorter), ``"minus_one"`` maps them to -1.
        """
        if unknown not in ("error", "drop", "minus_one"):
            raise ValueError(f"unknown={unknown!r}: expected 'error', 'drop' or 'minus_one'")
        query = _as_strings(external_ids)
        out = self._lookup.get_indexer(query).astype(np.int64)  # (q,)
        missing = out < 0
        if missing.any():
            if unknown == "error":
                first = int(np.flatnonzero(missing)[0])
                raise KeyError(f"unknown id {query[first]!r} at position {first}")
            if unknown == "drop":
                out = out[~missing]
        return out

    def external(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """Return the external ids of dense ``indices`` (``IndexError`` when out of range)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)})")
        return self.ids[idx]


def _as_strings(ids: Iterable[object]) -> np.ndarray:
    """Return ``ids`` as a flat object array of str (ids are compared as strings)."""
    values = ids if isinstance(ids, np.ndarray) else np.asarray(list(ids), dtype=object)
    return values.reshape(-1).astype(str).astype(object)  # (n,)


@dataclasses.dataclass(frozen=True)
class Interactions:
    """Columnar interactions, one row each, on dense indices.

    ``user``, ``item``: int64 (n,); ``rating``: float32 (n,), 1.0 when the log has none;
    ``timestamp``: int64 (n,) unix seconds.
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.user)
        for name in ("user", "item", "rating", "timestamp"):
            value = getattr(self, name)
            if np.ndim(value) != 1 or len(value) != n:
                raise ValueError(f"Interactions.{name} must be 1-D of length {n}")
        object.__setattr__(self, "user", np.asarray(self.user, dtype=np.int64))
        object.__setattr__(self, "item", np.asarray(self.item, dtype=np.int64))
        object.__setattr__(self, "rating", np.asarray(self.rating, dtype=np.float32))
        object.__setattr__(self, "timestamp", np.asarray(self.timestamp, dtype=np.int64))

    @classmethod
    def empty(cls) -> Interactions:
        """Return zero interactions."""
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, np.zeros(0, dtype=np.float32), z)

    def __len__(self) -> int:
        return len(self.user)

    def take(self, mask_or_idx: np.ndarray) -> Interactions:
        """Return the rows selected by a boolean mask or an index array, in that order."""
        sel = np.asarray(mask_or_idx)
        if sel.dtype != bool:
            sel = sel.astype(np.int64)
        return Interactions(self.user[sel], self.item[sel], self.rating[sel], self.timestamp[sel])

    def matrix(self, n_users: int, n_items: int) -> sp.csr_matrix:
        """Return the binary float32 ``(n_users, n_items)`` matrix (repeats count once)."""
        data = np.ones(len(self), dtype=np.float32)
        m = sp.csr_matrix((data, (self.user, self.item)), shape=(n_users, n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        m.sort_indices()
        return m


@dataclasses.dataclass(frozen=True)
class FeatureTable:
    """Columnar features indexed by dense id (row ``i`` describes user or item ``i``).

    ``categorical``: int64 codes in ``[0, cardinality[name])``, (n,); code 0 is "unknown" when
    a value can be missing. ``numeric``: float32 (n,), raw values (not standardized), missing
    values already imputed (see the loader). ``multi_hot``: float32 (n, m). ``vocab`` names the
    codes of a categorical column or the m columns of a multi-hot one.
    """

    n_rows: int
    categorical: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    cardinality: dict[str, int] = dataclasses.field(default_factory=dict)
    numeric: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    multi_hot: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    vocab: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, codes in self.categorical.items():
            if codes.shape != (self.n_rows,):
                raise ValueError(f"categorical {name!r} has shape {codes.shape}")
            card = self.cardinality.get(name)
            if card is None:
                raise ValueError(f"categorical {name!r} has no cardinality")
            if codes.size and (codes.min() < 0 or codes.max() >= card):
                raise ValueError(f"categorical {name!r} codes outside [0, {card})")
        for name, values in self.numeric.items():
            if values.shape != (self.n_rows,):
                raise ValueError(f"numeric {name!r} has shape {values.shape}")
        for name, values in self.multi_hot.items():
            if values.ndim != 2 or values.shape[0] != self.n_rows:
                raise ValueError(f"multi_hot {name!r} has shape {values.shape}")

    @classmethod
    def empty(cls, n_rows: int) -> FeatureTable:
        """Return a table of ``n_rows`` rows and no columns."""
        return cls(n_rows=n_rows)

    def standardized(self) -> FeatureTable:
        """Return a copy whose numeric columns have mean 0 and std 1 (constant ones become 0).

        ``<name>_missing`` 0/1 flags are left as they are.
        """
        numeric = {}
        for name, values in self.numeric.items():
            if name.endswith("_missing"):
                numeric[name] = values
                continue
            x = values.astype(np.float64)
            std = x.std()
            numeric[name] = ((x - x.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
        return dataclasses.replace(self, numeric=numeric)

    @property
    def names(self) -> list[str]:
        """Return every column name: categorical, then numeric, then multi-hot."""
        return [*self.categorical, *self.numeric, *self.multi_hot]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Interactions with their id maps, feature tables and display titles."""

    name: str
    users: IdMap
    items: IdMap
    interactions: Interactions
    user_features: FeatureTable
    item_features: FeatureTable
    item_titles: np.ndarray | None = None  # (n_items,) str
    # Text columns of the item table, {name: (n_items,) str}: they feed the search index,
    # not the ranker (MovieLens: none here; its titles are item_titles).
    item_text: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        inter = self.interactions
        if len(inter) and (inter.user.min() < 0 or inter.user.max() >= len(self.users)):
            raise ValueError(f"Dataset {self.name!r}: user indices outside [0, {len(self.users)})")
        if len(inter) and (inter.item.min() < 0 or inter.item.max() >= len(self.items)):
            raise ValueError(f"Dataset {self.name!r}: item indices outside [0, {len(self.items)})")
        if self.user_features.n_rows != len(self.users):
            raise ValueError(f"Dataset {self.name!r}: user_features rows != {len(self.users)}")
        if self.item_features.n_rows != len(self.items):
            raise ValueError(f"Dataset {self.name!r}: item_features rows != {len(self.items)}")
        if self.item_titles is not None and len(self.item_titles) != len(self.items):
            raise ValueError(f"Dataset {self.name!r}: item_titles length != {len(self.items)}")
        for column, values in (self.item_text or {}).items():
            if len(values) != len(self.items):
                raise ValueError(f"Dataset {self.name!r}: item_text {column!r} length != items")

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)


@dataclasses.dataclass(frozen=True)
class Split:
    """Train / valid / test interactions over one index space."""

    train: Interactions
    valid: Interactions
    test: Interactions
    n_users: int
    n_items: int

    def train_matrix(self) -> sp.csr_matrix:
        return self.train.matrix(self.n_users, self.n_items)

    def valid_matrix(self) -> sp.csr_matrix:
        return self.valid.matrix(self.n_users, self.n_items)

    def test_matrix(self) -> sp.csr_matrix:
        return self.test.matrix(self.n_users, self.n_items)

    def seen_for_valid(self) -> sp.csr_matrix:
        """Return what a user already has when validating: the training items."""
        return self.train_matrix()

    def seen_for_test(self) -> sp.csr_matrix:
        """Return what a user already has when testing: training and validation items."""
        both = self.train_matrix() + self.valid_matrix()
        both.data[:] = 1.0
        return both


def load_dataset(name_or_path: str) -> Dataset:
    """Return ``"movielens-100k"`` (fetched on demand), a logs file, or a directory.

    A directory holds either ``interactions.parquet`` (with optional ``users.parquet`` and
    ``items.parquet`` feature tables: a logs directory, as ``slimrank data generate world``
    writes) or one ``<stem>.inter`` RecBole atomic file (``.user``, ``.item`` optional).
    """
    from slimrank.data import logs, movielens

    if name_or_path in movielens.NAMES:
        return movielens.load_movielens_100k()
    path = Path(name_or_path)
    if path.is_dir() and (path / logs.LOGS_DIR_FILES[0]).is_file():
        return logs.load_logs_dir(path)
    if path.is_dir():
        stem = _atomic_stem(path)
        return movielens.load_atomic_dataset(path, stem, name=stem)
    return logs.load_logs(path)


def dataset_files(name_or_path: str) -> list[Path]:
    """Return every file :func:`load_dataset` reads for ``name_or_path`` (fetching ml-100k).

    The pipeline keys its data step by these files' content.
    """
    from slimrank.data import logs, movielens
    from slimrank.data.fetch import fetch_movielens_100k

    if name_or_path in movielens.NAMES:
        directory, stem = fetch_movielens_100k()[0], "ml-100k"
    elif Path(name_or_path).is_dir() and (Path(name_or_path) / logs.LOGS_DIR_FILES[0]).is_file():
        inter, *tables = (Path(name_or_path) / name for name in logs.LOGS_DIR_FILES)
        return [inter, *(t for t in tables if t.exists())]
    elif Path(name_or_path).is_dir():
        directory = Path(name_or_path)
        stem = _atomic_stem(directory)
    else:
        return [Path(name_or_path)]
    files = [directory / f"{stem}{suffix}" for suffix in (".inter", ".user", ".item")]
    return [f for f in files if f.suffix == ".inter" or f.exists()]


def _atomic_stem(path: Path) -> str:
    """Return the stem of the one ``*.inter`` file in the directory ``path``."""
    from slimrank.errors import DataError

    inter = sorted(path.glob("*.inter"))
    if len(inter) != 1:
        raise DataError(f"expected one *.inter file, found {len(inter)}", path=path)
    return inter[0].name.removesuffix(".inter")


def split_random(
    interactions: Interactions,
    n_users: int,
    n_items: int,
    ratios: tuple[float, ...] = (0.8, 0.1, 0.1),
    seed: int = 2020,
) -> Split:
    """Return RecBole 1.2.1's ``RS`` split grouped by user (see :mod:`slimrank.data.split`)."""
    from slimrank.data.split import split_by_user

    return split_by_user(interactions, n_users, n_items, ratios, seed)


def item_popularity(train: Interactions, n_items: int) -> np.ndarray:
    """Return float32 ``(n_items,)`` interaction counts of each item in ``train`` only."""
    return np.bincount(train.item, minlength=n_items).astype(np.float32)
