"""MovieLens-100k from RecBole's atomic files: interactions, user and item features.

Every rating is an interaction (RecBole's quick-start protocol). Ids are indexed in the order
they first appear in ``ml-100k.inter`` (users and items absent from it are dropped from the
feature tables). User features: ``age_bucket`` (MovieLens-1M age groups), ``gender``,
``occupation`` (categorical). Item features: ``genre`` (multi-hot over the 19 ML genres,
``unknown`` included), ``release_year`` (numeric, raw years; the 2 non-year values are
missing, set to the median, flagged in ``release_year_missing``). Item popularity is not a
stored feature: take it from the training split with
:func:`slimrank.data.dataset.item_popularity`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slimrank.data.atomic import float_column, read_atomic, require_columns
from slimrank.data.dataset import Dataset, FeatureTable, IdMap, Interactions
from slimrank.data.features import (
    AGE_LABELS,
    age_buckets,
    categorical_codes,
    multi_hot,
    numeric_with_missing,
)
from slimrank.data.fetch import fetch_movielens_100k
from slimrank.errors import DataError

NAMES = ("movielens-100k", "ml-100k")


def load_movielens_100k(directory: str | Path | None = None) -> Dataset:
    """Return ml-100k from ``directory`` (default: the cache, fetched when absent)."""
    if directory is None:
        directory, _ = fetch_movielens_100k()
    return load_atomic_dataset(Path(directory), "ml-100k", name="movielens-100k")


def load_atomic_dataset(directory: Path, stem: str, name: str) -> Dataset:
    """Return the dataset of ``<stem>.inter`` (+ ``.user``, ``.item``) in ml-100k's schema."""
    inter_path = directory / f"{stem}.inter"
    frame, types = read_atomic(inter_path)
    require_columns(types, ("user_id", "item_id"), inter_path)
    for column in ("user_id", "item_id"):
        empty = (frame[column] == "").to_numpy()
        if empty.any():
            row = int(np.flatnonzero(empty)[0])
            raise DataError("empty id", path=inter_path, column=column, row=row, line=row + 2)
    users = IdMap.from_ids(frame["user_id"].to_numpy())
    items = IdMap.from_ids(frame["item_id"].to_numpy())
    n = len(frame)
    rating = float_column(frame, "rating", inter_path) if "rating" in types else np.ones(n)  # (n,)
    timestamp = (
        float_column(frame, "timestamp", inter_path) if "timestamp" in types else np.zeros(n)
    )  # (n,)
    interactions = Interactions(
        user=users.index(frame["user_id"].to_numpy()),
        item=items.index(frame["item_id"].to_numpy()),
        rating=rating.astype(np.float32),
        timestamp=timestamp.astype(np.int64),
    )
    user_path, item_path = directory / f"{stem}.user", directory / f"{stem}.item"
    user_features = (
        _user_features(user_path, users) if user_path.exists() else FeatureTable.empty(len(users))
    )
    if item_path.exists():
        item_features, titles = _item_features(item_path, items)
    else:
        item_features, titles = FeatureTable.empty(len(items)), None
    return Dataset(name, users, items, interactions, user_features, item_features, titles)


def _aligned(frame: pd.DataFrame, ids: IdMap, path: Path, id_column: str) -> pd.DataFrame:
    """Return ``frame`` reindexed to ``ids`` order (rows of ids absent from it are NaN)."""
    require_columns({c: "" for c in frame.columns}, (id_column,), path)
    duplicated = frame[id_column].duplicated().to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise DataError("duplicate id", path=path, column=id_column, row=row, line=row + 2)
    index = ids.index(frame[id_column].to_numpy(), unknown="minus_one")
    known = index >= 0  # ids that never interact are dropped, like RecBole's remapping
    out = pd.DataFrame(index=pd.RangeIndex(len(ids)), columns=frame.columns, dtype=object)
    out.iloc[index[known]] = frame[known].to_numpy(dtype=object)
    return out


def _user_features(path: Path, users: IdMap) -> FeatureTable:
    frame, types = read_atomic(path)
    require_columns(types, ("user_id", "age", "gender", "occupation"), path)
    aligned = _aligned(frame, users, path, "user_id")
    age = pd.to_numeric(aligned["age"], errors="coerce").to_numpy(dtype=np.float64)
    columns = {
        "age_bucket": age_buckets(age),
        "gender": aligned["gender"].to_numpy(dtype=object),
        "occupation": aligned["occupation"].to_numpy(dtype=object),
    }
    categorical, cardinality, vocab = {}, {}, {}
    for name, values in columns.items():
        order = AGE_LABELS if name == "age_bucket" else None
        categorical[name], vocab[name] = categorical_codes(values, order)
        cardinality[name] = len(vocab[name])
    return FeatureTable(len(users), categorical, cardinality, vocab=vocab)


def _item_features(path: Path, items: IdMap) -> tuple[FeatureTable, np.ndarray]:
    frame, types = read_atomic(path)
    require_columns(types, ("item_id", "movie_title", "release_year", "class"), path)
    aligned = _aligned(frame, items, path, "item_id")
    genres = [[] if not isinstance(v, str) else v.split() for v in aligned["class"]]
    genre_matrix, genre_vocab = multi_hot(genres)  # (n_items, 19)
    year = pd.to_numeric(aligned["release_year"], errors="coerce").to_numpy(dtype=np.float64)
    year_filled, year_missing = numeric_with_missing(year)
    titles = aligned["movie_title"].fillna("").to_numpy(dtype=str)  # (n_items,)
    table = FeatureTable(
        len(items),
        numeric={"release_year": year_filled, "release_year_missing": year_missing},
        multi_hot={"genre": genre_matrix},
        vocab={"genre": genre_vocab},
    )
    return table, titles
