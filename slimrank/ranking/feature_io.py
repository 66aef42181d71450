"""The feature tables a bundle ships: one safetensors file and a JSON-able layout.

:func:`save_tables` writes what :func:`~slimrank.ranking.features.candidate_features` reads,
except the user and item vectors (the bundle stores them beside it, and serving reads them
anyway), and returns the layout that :func:`load_tables` needs back: sizes, the feature config,
the side-feature names and the feature names, which the loaded tables must reproduce.
Nothing here unpickles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimrank.bundle.formats import read_tensors, write_tensors
from slimrank.ranking.features import FeatureConfig, FeatureTables
from slimrank.ranking.histories import Histories
from slimrank.ranking.neighbors import NeighborTable


def _neighbors(name: str, table: NeighborTable) -> dict[str, np.ndarray]:
    return {
        f"{name}/indices": table.indices,
        f"{name}/values": table.values,
    }


def save_tables(path: str | Path, tables: FeatureTables) -> dict[str, Any]:
    """Write ``tables`` (vectors excepted) to ``path``; return the layout to load them."""
    tensors = {
        "history/indptr": tables.history.indptr,
        "history/items": tables.history.items,
        "item_log_popularity": tables.item_log_popularity,
        "user_side": tables.user_side,
        "item_side": tables.item_side,
        **_neighbors("cooc", tables.cooc),
    }
    if tables.ease is not None:
        tensors.update(_neighbors("ease", tables.ease))
    write_tensors(path, {k: np.ascontiguousarray(v) for k, v in tensors.items()})
    return {
        "n_users": tables.n_users,
        "n_items": tables.n_items,
        "feature_config": tables.config.to_dict(),
        "feature_names": list(tables.feature_names),
        "user_side_names": list(tables.user_side_names),
        "item_side_names": list(tables.item_side_names),
        "has_ease": tables.ease is not None,
    }


def load_tables(
    path: str | Path, layout: dict[str, Any], user_vecs: np.ndarray, item_vecs: np.ndarray
) -> FeatureTables:
    """Return the tables :func:`save_tables` wrote; ``ValueError`` if they do not fit ``layout``."""
    t = read_tensors(path)
    n_users, n_items = int(layout["n_users"]), int(layout["n_items"])
    try:
        history = Histories(t["history/indptr"], t["history/items"], n_items)

        def neighbors(name: str) -> NeighborTable:
            return NeighborTable(t[f"{name}/indices"], t[f"{name}/values"])

        tables = FeatureTables(
            config=FeatureConfig.from_dict(layout["feature_config"]),
            history=history,
            user_vecs=np.ascontiguousarray(user_vecs, dtype=np.float32),
            item_vecs=np.ascontiguousarray(item_vecs, dtype=np.float32),
            item_log_popularity=t["item_log_popularity"],
            user_side=t["user_side"],
            user_side_names=tuple(layout["user_side_names"]),
            item_side=t["item_side"],
            item_side_names=tuple(layout["item_side_names"]),
            cooc=neighbors("cooc"),
            ease=neighbors("ease") if layout["has_ease"] else None,
        )
    except KeyError as err:
        raise ValueError(f"{path}: no tensor {err}") from err
    if tables.n_users != n_users:
        raise ValueError(f"{path}: {tables.n_users} histories, the layout says {n_users} users")
    if list(tables.feature_names) != list(layout["feature_names"]):
        raise ValueError(f"{path}: the tables do not produce the feature names of their layout")
    return tables
