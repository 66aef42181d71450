"""User and item vectors of a trained two-tower model: compute, save and load them.

Serving and the FAISS index read these files, not the model: ``item_embeddings.npy`` (I, d),
``user_embeddings.npy`` (U, d), float32, row ``i`` for dense index ``i``, and the external ids
of both as ``item_ids.npy`` / ``user_ids.npy`` (unicode arrays), all loadable with
``allow_pickle=False``; ``embeddings.safetensors`` holds the same two matrices.

A user vector depends on the history it pools. :func:`history_for` gives the history of each
evaluation view: the training items when validating, training plus validation items when
testing (what a server would know about the user at test time). Those are the same items the
protocol excludes from the ranking.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from slimrank.data.dataset import FeatureTable, Interactions, Split
from slimrank.retrieval.two_tower import TwoTower, UserHistory, feature_tensors, take_rows

USER_FILE = "user_embeddings.npy"
ITEM_FILE = "item_embeddings.npy"
USER_IDS_FILE = "user_ids.npy"
ITEM_IDS_FILE = "item_ids.npy"
SAFETENSORS_FILE = "embeddings.safetensors"


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """User vectors (U, d) and item vectors (I, d), float32, with optional external ids."""

    user: np.ndarray
    item: np.ndarray
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None


def history_for(split: Split, view: Literal["valid", "test"], max_history: int = 0) -> UserHistory:
    """Return the histories a user vector pools in ``view``: train, or train plus valid."""
    if view == "valid":
        seen = split.train
    elif view == "test":
        seen = Interactions(
            *(
                np.concatenate([getattr(split.train, f), getattr(split.valid, f)])
                for f in ("user", "item", "rating", "timestamp")
            )
        )
    else:
        raise ValueError(f"view={view!r}: expected 'valid' or 'test'")
    return UserHistory.from_interactions(seen, split.n_users, max_history)


@torch.no_grad()
def export_embeddings(
    model: TwoTower,
    history: UserHistory | None = None,
    user_features: FeatureTable | None = None,
    item_features: FeatureTable | None = None,
    batch_size: int = 4096,
    users: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (user_vecs (U, d), item_vecs (I, d)) float32 for every user and item.

    ``users``: only these users' vectors, one row each in this order (an evaluation sample:
    at 1M users, pooling every history to rank 2,000 of them took minutes).

    The dot product ranks items as the model does. With ``item_bias`` both are d + 1 wide:
    users get a last column of ones, items their bias divided by the logit scale.
    ``history`` is needed when the model pools one; the features when it reads them. The
    model is switched to eval mode (no dropout) and left there.
    """
    config = model.config
    model.eval()
    if config.use_history and history is None:
        raise ValueError("the model pools a user history; pass history=")
    if history is not None and history.n_users != config.n_users:
        raise ValueError(f"history has {history.n_users} users, the model {config.n_users}")
    ufeat = _features(user_features, config.user_features, config.n_users, "user")
    ifeat = _features(item_features, config.item_features, config.n_items, "item")
    wanted = np.arange(config.n_users) if users is None else np.array(users, dtype=np.int64)
    users = []
    for start in range(0, len(wanted), batch_size):
        idx = wanted[start : start + batch_size]
        rows = torch.as_tensor(idx)
        bag_items = bag_offsets = None
        if config.use_history:
            items, offsets = history.bags(idx)
            bag_items, bag_offsets = torch.as_tensor(items), torch.as_tensor(offsets)
        feats = None if ufeat is None else take_rows(ufeat, rows)
        users.append(model.user_vectors(rows, feats, bag_items, bag_offsets))
    items = []
    for start in range(0, config.n_items, batch_size):
        rows = torch.arange(start, min(start + batch_size, config.n_items))
        feats = None if ifeat is None else take_rows(ifeat, rows)
        items.append(model.item_vectors(rows, feats))
    user_vecs = torch.cat(users)  # (U, d)
    item_vecs = torch.cat(items)  # (I, d)
    if model.item_bias is not None:
        # u . v + b / scale ranks as the training logit scale * u . v + b does.
        user_vecs = torch.cat([user_vecs, torch.ones(len(user_vecs), 1)], dim=1)  # (U, d + 1)
        bias = model.item_bias.weight / model.scale()  # (I, 1)
        item_vecs = torch.cat([item_vecs, bias], dim=1)  # (I, d + 1)
    return user_vecs.numpy().astype(np.float32), item_vecs.numpy().astype(np.float32)


def _features(table, spec, n_rows: int, side: str) -> dict[str, torch.Tensor] | None:
    if spec.empty:
        return None
    if table is None:
        raise ValueError(f"the model reads {side} features; pass {side}_features=")
    if table.n_rows != n_rows:
        raise ValueError(f"{side} feature table has {table.n_rows} rows, the model {n_rows}")
    return feature_tensors(table, spec)


def save_embeddings(directory: str | Path, embeddings: Embeddings) -> Path:
    """Write the embedding files described in the module docstring; return ``directory``."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    user = np.ascontiguousarray(embeddings.user, dtype=np.float32)
    item = np.ascontiguousarray(embeddings.item, dtype=np.float32)
    np.save(directory / USER_FILE, user, allow_pickle=False)
    np.save(directory / ITEM_FILE, item, allow_pickle=False)
    save_file({"user": user, "item": item}, str(directory / SAFETENSORS_FILE))
    for ids, name in ((embeddings.user_ids, USER_IDS_FILE), (embeddings.item_ids, ITEM_IDS_FILE)):
        if ids is not None:
            np.save(directory / name, np.asarray(ids).astype(str), allow_pickle=False)
    return directory


def load_embeddings(directory: str | Path) -> Embeddings:
    """Return the embeddings :func:`save_embeddings` wrote (ids are ``None`` if absent)."""
    directory = Path(directory)

    def ids(name: str) -> np.ndarray | None:
        path = directory / name
        return np.load(path, allow_pickle=False) if path.exists() else None

    return Embeddings(
        user=np.load(directory / USER_FILE, allow_pickle=False),
        item=np.load(directory / ITEM_FILE, allow_pickle=False),
        user_ids=ids(USER_IDS_FILE),
        item_ids=ids(ITEM_IDS_FILE),
    )
