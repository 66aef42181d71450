"""Summary numbers of a dataset (what ``slimrank data info`` prints)."""

from __future__ import annotations

import datetime as dt

from slimrank.data.dataset import Dataset


def dataset_summary(dataset: Dataset) -> dict[str, object]:
    """Return users, items, interactions, density, date range and feature names."""
    inter = dataset.interactions
    n_pairs = len(dataset.interactions.matrix(dataset.n_users, dataset.n_items).data)
    cells = dataset.n_users * dataset.n_items
    first = last = None
    if len(inter):
        first = dt.datetime.fromtimestamp(int(inter.timestamp.min()), tz=dt.UTC)
        last = dt.datetime.fromtimestamp(int(inter.timestamp.max()), tz=dt.UTC)
    return {
        "name": dataset.name,
        "users": dataset.n_users,
        "items": dataset.n_items,
        "interactions": len(inter),
        "distinct user-item pairs": n_pairs,
        "density": n_pairs / cells if cells else 0.0,
        "first interaction": first.isoformat() if first else "-",
        "last interaction": last.isoformat() if last else "-",
        "user features": ", ".join(dataset.user_features.names) or "-",
        "item features": ", ".join(dataset.item_features.names) or "-",
    }
