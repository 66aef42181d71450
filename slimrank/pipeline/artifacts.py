"""Pickle-free files for what the pipeline passes between steps and ships in a bundle.

Arrays go to safetensors (several named arrays, a JSON string in the header for the rest) or
``.npy``; nothing here unpickles. The serving tables (:func:`save_serving_tables`) are what
:func:`slimrank.ranking.features.candidate_features` reads at request time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from slimrank.bundle.formats import read_tensors, read_tensors_metadata, write_tensors
from slimrank.data.dataset import FeatureTable, Interactions, Split
from slimrank.ranking.candidates import Candidates
from slimrank.ranking.features import (
    CandidateFeatures,
    FeatureConfig,
    FeatureTables,
    ItemItem,
)

_FIELDS = ("user", "item", "rating", "timestamp")


def save_feature_table(path: str | Path, table: FeatureTable) -> None:
    """Write a :class:`FeatureTable` as safetensors (cardinalities and vocab in the header)."""
    tensors: dict[str, np.ndarray] = {}
    for kind in ("categorical", "numeric", "multi_hot"):
        for name, values in getattr(table, kind).items():
            tensors[f"{kind}/{name}"] = np.ascontiguousarray(values)
    meta = {
        "n_rows": table.n_rows,
        "cardinality": {k: int(v) for k, v in table.cardinality.items()},
        "vocab": {k: [str(x) for x in v] for k, v in table.vocab.items()},
        "order": {
            kind: list(getattr(table, kind)) for kind in ("categorical", "numeric", "multi_hot")
        },
    }
    if not tensors:  # safetensors needs one tensor; an empty table still round-trips
        tensors["_empty"] = np.zeros(0, dtype=np.float32)
    write_tensors(path, tensors, {"feature_table": json.dumps(meta)})


def load_feature_table(path: str | Path) -> FeatureTable:
    """Return the :class:`FeatureTable` written by :func:`save_feature_table`."""
    meta = json.loads(read_tensors_metadata(path)["feature_table"])
    tensors = read_tensors(path)
    columns = {
        kind: {name: tensors[f"{kind}/{name}"] for name in names}
        for kind, names in meta["order"].items()
    }
    return FeatureTable(
        n_rows=int(meta["n_rows"]),
        categorical=columns["categorical"],
        cardinality=meta["cardinality"],
        numeric=columns["numeric"],
        multi_hot=columns["multi_hot"],
        vocab=meta["vocab"],
    )


def save_split(path: str | Path, split: Split) -> None:
    """Write the train / valid / test interactions of ``split`` as one safetensors file."""
    tensors = {
        f"{part}/{f}": np.ascontiguousarray(getattr(getattr(split, part), f))
        for part in ("train", "valid", "test")
        for f in _FIELDS
    }
    meta = {"n_users": split.n_users, "n_items": split.n_items}
    write_tensors(path, tensors, {"split": json.dumps(meta)})


def load_split(path: str | Path) -> Split:
    """Return the :class:`Split` written by :func:`save_split`."""
    meta = json.loads(read_tensors_metadata(path)["split"])
    t = read_tensors(path)
    parts = {
        part: Interactions(*(t[f"{part}/{f}"] for f in _FIELDS))
        for part in ("train", "valid", "test")
    }
    return Split(**parts, n_users=int(meta["n_users"]), n_items=int(meta["n_items"]))


def interactions_from_matrix(matrix: sp.csr_matrix) -> Interactions:
    """Return one interaction per non-zero of a binary ``(U, I)`` matrix (timestamps 0)."""
    m = sp.csr_matrix(matrix)
    user = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    item = m.indices.astype(np.int64)
    return Interactions(user, item, np.ones(len(user), np.float32), np.zeros(len(user), np.int64))


def save_view(
    path: str | Path,
    cands: Candidates,
    feats: CandidateFeatures,
    labels: np.ndarray,
) -> None:
    """Write candidates, their ``(U, N, F)`` features and ``(U, N)`` labels."""
    write_tensors(
        path,
        {
            "user": cands.user,
            "items": cands.items,
            "retrieval_score": cands.retrieval_score,
            "features": feats.values,
            "labels": labels.astype(np.float32),
        },
        {"names": json.dumps(list(feats.names))},
    )


def load_view(path: str | Path) -> tuple[Candidates, CandidateFeatures, np.ndarray]:
    """Return ``(candidates, features, labels)`` written by :func:`save_view`."""
    names = tuple(json.loads(read_tensors_metadata(path)["names"]))
    t = read_tensors(path)
    cands = Candidates(t["user"], t["items"], t["retrieval_score"])
    feats = CandidateFeatures(t["features"], names, cands.user, cands.items)
    return cands, feats, t["labels"]


def _item_item(name: str, table: ItemItem) -> dict[str, np.ndarray]:
    """Return the arrays of an item-item table: sorted keys and values, or a dense matrix."""
    out = {f"{name}_keys": table.keys, f"{name}_values": table.values}
    dense = getattr(table, "dense", None)
    if dense is not None:
        out[f"{name}_dense"] = dense
    return out


def _read_item_item(name: str, tensors: dict[str, np.ndarray], n_items: int) -> ItemItem:
    keys, values = tensors[f"{name}_keys"], tensors[f"{name}_values"]
    dense = tensors.get(f"{name}_dense")
    if dense is None:
        return ItemItem(n_items, keys, values)
    return ItemItem(n_items, keys, values, dense)


def save_serving_tables(path: str | Path, tables: FeatureTables) -> dict:
    """Write what :func:`candidate_features` reads, except the vectors; return its layout.

    The user and item vectors are stored beside it as ``user_vectors.npy`` and
    ``item_vectors.npy`` by the caller (serving reads them anyway).
    """
    history = sp.csr_matrix(tables.history)
    tensors = {
        "history_indptr": history.indptr.astype(np.int64),
        "history_indices": history.indices.astype(np.int64),
        "item_log_popularity": tables.item_log_popularity,
        "user_side": tables.user_side,
        "item_side": tables.item_side,
    }
    tensors.update(_item_item("cooc", tables.cooc))
    if tables.ease is not None:
        tensors.update(_item_item("ease", tables.ease))
    layout = {
        "n_users": int(history.shape[0]),
        "n_items": int(history.shape[1]),
        "feature_config": tables.config.to_dict(),
        "feature_names": list(tables.feature_names),
        "user_side_names": list(tables.user_side_names),
        "item_side_names": list(tables.item_side_names),
        "has_ease": tables.ease is not None,
    }
    write_tensors(path, {k: np.ascontiguousarray(v) for k, v in tensors.items()})
    return layout


def load_serving_tables(
    path: str | Path, layout: dict, user_vecs: np.ndarray, item_vecs: np.ndarray
) -> FeatureTables:
    """Return the :class:`FeatureTables` saved by :func:`save_serving_tables`.

    ``layout`` is the dict it returned (``serving.json["features"]`` in a bundle).
    """
    t = read_tensors(path)
    n_users, n_items = int(layout["n_users"]), int(layout["n_items"])
    indices = t["history_indices"]
    history = sp.csr_matrix(
        (np.ones(len(indices), np.float32), indices, t["history_indptr"]),
        shape=(n_users, n_items),
    )
    ease = _read_item_item("ease", t, n_items) if layout["has_ease"] else None
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
        cooc=_read_item_item("cooc", t, n_items),
        ease=ease,
    )
    if list(tables.feature_names) != list(layout["feature_names"]):
        raise ValueError("serving tables do not produce the feature names in their layout")
    return tables
