"""Pickle-free files for what the pipeline passes between steps and ships in a bundle.

Arrays go to safetensors (several named arrays, a JSON string in the header for the rest) or
``.npy``; nothing here unpickles. The feature tables a bundle ships are saved by
:mod:`slimrank.ranking.feature_io`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from slimrank.bundle.formats import read_tensors, read_tensors_metadata, write_tensors
from slimrank.data.dataset import FeatureTable, Interactions, Split
from slimrank.ranking.candidates import Candidates
from slimrank.ranking.features import CandidateFeatures

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


# -- a step's own files: one place names them, so steps do not reach for each other's names --

METRICS = "metrics.json"  # every evaluated step: {"valid": {...}, "test": {...}, ...}
RANKER = "model.onnx"  # a student step's ranker, taking raw candidate features
MODEL_INFO = "model.json"  # a student step's shape, cost and training record
STANDARDIZATION = "standardization.safetensors"  # the student's input mean and std
SCORES = "scores.safetensors"  # the teacher's (U, N) scores of each view


def save_metrics(step_dir: str | Path, metrics: dict) -> None:
    """Write a step's evaluation record."""
    from slimrank.bundle.formats import write_json

    write_json(Path(step_dir) / METRICS, metrics)


def load_metrics(step_dir: str | Path) -> dict:
    """Return a step's evaluation record."""
    return json.loads((Path(step_dir) / METRICS).read_text())


def ranker_path(step_dir: str | Path) -> Path:
    """Return the ONNX ranker a student step wrote."""
    return Path(step_dir) / RANKER


def load_model_info(step_dir: str | Path) -> dict:
    """Return a student step's ``model.json`` (hidden sizes, non-zero parameters, FLOPs...)."""
    return json.loads((Path(step_dir) / MODEL_INFO).read_text())


def save_standardization(step_dir: str | Path, mean: np.ndarray, std: np.ndarray) -> None:
    """Write the ``(F,)`` mean and std a student's inputs are standardized with."""
    write_tensors(Path(step_dir) / STANDARDIZATION, {"mean": mean, "std": std})


def load_standardization(step_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``(F,)`` mean and std a student step standardized its inputs with."""
    t = read_tensors(Path(step_dir) / STANDARDIZATION)
    return t["mean"], t["std"]
