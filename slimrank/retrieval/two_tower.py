"""The two-tower retrieval model: a user tower and an item tower that map into one space.

The user tower reads the user id, the user's features and the mean of the item embeddings of
the user's history; the item tower reads the item id and the item's features. Each ends in an
MLP to ``dim`` outputs, optionally L2-normalized, so that retrieval is a maximum inner product
search (FAISS ``IndexFlatIP`` or PQ) over the item vectors.

Features enter as ``dict[str, Tensor]`` rows gathered from a :class:`FeatureTable` with
:func:`feature_tensors`; the history enters as flat bags (``items``, ``offsets``) built by
:class:`UserHistory`. The model holds no data, only weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimrank.data.dataset import FeatureTable, Interactions
from slimrank.retrieval.two_tower_config import (
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    FeatureSpec,
    TwoTowerConfig,
)


@dataclasses.dataclass(frozen=True)
class UserHistory:
    """Each user's past items as CSR bags, oldest first, at most ``max_history`` per user.

    ``indptr``: int64 (n_users + 1,); ``items``: int64 (nnz,). The items of user ``u`` are
    ``items[indptr[u]:indptr[u + 1]]``.
    """

    indptr: np.ndarray
    items: np.ndarray

    @classmethod
    def from_interactions(
        cls, interactions: Interactions, n_users: int, max_history: int = 0
    ) -> UserHistory:
        """Return the histories in ``interactions``, keeping the ``max_history`` most recent."""
        order = np.lexsort((interactions.timestamp, interactions.user))  # by user, then time
        users = interactions.user[order]
        items = interactions.item[order]
        counts = np.bincount(users, minlength=n_users)  # (U,)
        if max_history > 0:
            ends = np.cumsum(counts)[users]  # end of each row's user block
            keep = ends - np.arange(len(users)) <= max_history
            users, items = users[keep], items[keep]
            counts = np.minimum(counts, max_history)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr=indptr, items=items.astype(np.int64))

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    def lengths(self, users: np.ndarray) -> np.ndarray:
        """Return the int64 history length of each of ``users``."""
        return self.indptr[users + 1] - self.indptr[users]

    def bags(
        self, users: np.ndarray, drop: float = 0.0, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return flat ``items`` (N,) and ``offsets`` (B,) of the bags of ``users`` (B,).

        ``drop`` removes each entry with that probability, drawn from ``rng``.
        """
        users = np.asarray(users, dtype=np.int64)
        lengths = self.lengths(users)  # (B,)
        offsets = _offsets(lengths)
        row = np.repeat(np.arange(len(users)), lengths)  # (N,)
        pos = self.indptr[users][row] + np.arange(int(lengths.sum())) - offsets[row]
        items = self.items[pos]
        if drop > 0:
            if rng is None:
                raise ValueError("drop > 0 needs an rng")
            keep = rng.random(len(items)) >= drop
            items = items[keep]
            offsets = _offsets(np.bincount(row[keep], minlength=len(users)))
        return items, offsets


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """Return the int64 start of each bag given the bag lengths."""
    offsets = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return offsets


def bag_rows(offsets: np.ndarray, n: int) -> np.ndarray:
    """Return the bag (row) of each of the ``n`` flat entries of bags starting at ``offsets``."""
    lengths = np.diff(np.append(offsets, n))
    return np.repeat(np.arange(len(offsets)), lengths)


def feature_tensors(table: FeatureTable, spec: FeatureSpec) -> dict[str, torch.Tensor]:
    """Return every column ``spec`` names as a tensor over all rows of ``table``."""
    out: dict[str, torch.Tensor] = {}
    for name in spec.categorical:
        out[name] = torch.as_tensor(np.asarray(table.categorical[name], dtype=np.int64))
    for name in spec.numeric_mean:
        out[name] = torch.as_tensor(np.asarray(table.numeric[name], dtype=np.float32))
    for name in spec.multi_hot:
        out[name] = torch.as_tensor(np.asarray(table.multi_hot[name], dtype=np.float32))
    return out


def take_rows(features: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the ``rows`` of every feature column."""
    return {name: column[rows] for name, column in features.items()}


class MLP(nn.Sequential):
    """Linear -> ReLU -> Dropout per hidden size, then a linear layer to ``out_dim``."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = width
        layers.append(nn.Linear(in_dim, out_dim))
        super().__init__(*layers)


def _head(config: TwoTowerConfig, parts: int) -> MLP | None:
    """Return the MLP from a tower's ``parts`` concatenated embeddings to its output, or None
    for a tower without projection, whose output is the sum of its parts."""
    if not config.projection:
        return None
    return MLP(parts * config.id_dim, config.hidden, config.dim, config.dropout)


def _combine(mlp: MLP | None, parts: list[torch.Tensor]) -> torch.Tensor:
    """Return a tower's (B, dim) output from its (B, D) parts."""
    if mlp is None:
        return torch.stack(parts).sum(0)
    return mlp(torch.cat(parts, dim=1))


class FeatureEncoder(nn.Module):
    """Sum of one embedding per categorical column and a linear map of the dense columns."""

    def __init__(self, spec: FeatureSpec, dim: int):
        super().__init__()
        self.spec = spec
        self.names = sorted(spec.categorical)
        self.embeddings = nn.ModuleList(
            nn.Embedding(spec.categorical[name], dim) for name in self.names
        )
        self.dense = nn.Linear(spec.dense_width, dim) if spec.dense_width else None
        numeric = list(spec.numeric_mean)
        self.numeric = numeric
        mean = torch.tensor([spec.numeric_mean[k] for k in numeric], dtype=torch.float32)
        std = torch.tensor([spec.numeric_std[k] for k in numeric], dtype=torch.float32)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        out = None
        for name, embedding in zip(self.names, self.embeddings, strict=True):
            part = embedding(features[name])  # (B, D)
            out = part if out is None else out + part
        if self.dense is not None:
            columns = []
            if self.numeric:
                raw = torch.stack([features[k] for k in self.numeric], dim=1)  # (B, n_num)
                columns.append((raw - self.mean) / self.std)
            columns += [features[k] for k in self.spec.multi_hot]  # (B, m) each
            part = self.dense(torch.cat(columns, dim=1))  # (B, D)
            out = part if out is None else out + part
        return out


class UserTower(nn.Module):
    """User id, user features and mean-pooled history -> MLP -> (B, dim)."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        d = config.id_dim
        self.id_embedding = nn.Embedding(config.n_users, d) if config.use_user_id else None
        self.features = (
            None if config.user_features.empty else FeatureEncoder(config.user_features, d)
        )
        # Its own item table: what an item says about a user who has it is not what makes
        # the item a good answer, and sharing the table ties the two.
        self.history = (
            nn.EmbeddingBag(config.n_items, d, mode="sum") if config.use_history else None
        )
        parts = sum(m is not None for m in (self.id_embedding, self.features, self.history))
        self.mlp = _head(config, parts)

    def pool(self, items: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the (B, D) sums of the history bags and their (B,) sizes."""
        if self.history is None:
            raise ValueError("this user tower pools no history")
        sums = self.history(items, offsets)  # (B, D), an empty bag sums to 0
        counts = torch.diff(offsets, append=offsets.new_tensor([len(items)]))  # (B,)
        return sums, counts

    def forward(
        self,
        users: torch.Tensor,
        features: dict[str, torch.Tensor] | None = None,
        history: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return (B, dim) for ``users`` (B,), their feature rows and (B, D) pooled history."""
        parts = []
        if self.id_embedding is not None:
            parts.append(self.id_embedding(users))  # (B, D)
        if self.features is not None:
            if features is None:
                raise ValueError("this user tower reads user features; none were given")
            parts.append(self.features(features))  # (B, D)
        if self.history is not None:
            if history is None:
                raise ValueError("this user tower pools a history; none was given")
            parts.append(history)  # (B, D)
        return _combine(self.mlp, parts)


class ItemTower(nn.Module):
    """Item id and item features -> MLP -> (B, dim)."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        d = config.id_dim
        self.id_embedding = nn.Embedding(config.n_items, d) if config.use_item_id else None
        self.features = (
            None if config.item_features.empty else FeatureEncoder(config.item_features, d)
        )
        parts = sum(m is not None for m in (self.id_embedding, self.features))
        self.mlp = _head(config, parts)

    def forward(
        self, items: torch.Tensor, features: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Return (B, dim) for ``items`` (B,) and their feature rows."""
        parts = []
        if self.id_embedding is not None:
            parts.append(self.id_embedding(items))  # (B, D)
        if self.features is not None:
            if features is None:
                raise ValueError("this item tower reads item features; none were given")
            parts.append(self.features(features))  # (B, D)
        return _combine(self.mlp, parts)


class TwoTower(nn.Module):
    """The user and item towers; a user's score for an item is the dot of their outputs."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        self.config = config
        self.user_tower = UserTower(config)
        self.item_tower = ItemTower(config)
        log_scale = torch.tensor(-math.log(config.temperature), dtype=torch.float32)
        if config.learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        if config.init_std > 0:
            for module in self.modules():
                if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                    nn.init.normal_(module.weight, std=config.init_std)
        self.item_bias = None
        if config.item_bias:
            self.item_bias = nn.Embedding(config.n_items, 1)
            nn.init.zeros_(self.item_bias.weight)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.config.normalize else x

    def user_vectors(
        self,
        users: torch.Tensor,
        features: dict[str, torch.Tensor] | None = None,
        history_items: torch.Tensor | None = None,
        history_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the (B, dim) user vectors, normalized when the config says so.

        ``history_items`` (N,) and ``history_offsets`` (B,) are the users' history bags (see
        :meth:`UserHistory.bags`); the tower reads their sum / n ** history_power (the mean
        by default), 0 for an empty bag.
        """
        pooled = None
        if self.config.use_history:
            if history_items is None or history_offsets is None:
                raise ValueError("this model pools a user history; none was given")
            sums, counts = self.user_tower.pool(history_items, history_offsets)
            pooled = self.pool_scale(sums, counts)  # (B, D)
        return self.user_vectors_pooled(users, features, pooled)

    def pool_scale(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Return history sums (B, D) divided by their bag sizes (B,) to the pooling power."""
        counts = counts.to(sums.dtype).clamp(min=1.0)
        return sums / counts.pow(self.config.history_power)[:, None]

    def user_vectors_pooled(
        self,
        users: torch.Tensor,
        features: dict[str, torch.Tensor] | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the (B, dim) user vectors given an already pooled (B, D) history."""
        return self._finish(self.user_tower(users, features, pooled))

    def item_vectors(
        self, items: torch.Tensor, features: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Return the (B, dim) item vectors, normalized when the config says so."""
        return self._finish(self.item_tower(items, features))

    def scale(self) -> torch.Tensor:
        """Return the logit scale 1 / temperature."""
        return self.log_scale.exp()

    def logits(
        self, user_vecs: torch.Tensor, item_vecs: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        """Return the (B, N) training logits ``scale * u . v`` plus the item bias, if any.

        ``user_vecs`` (B, dim), ``item_vecs`` (N, dim) the vectors of ``items`` (N,).
        """
        out = self.scale() * user_vecs @ item_vecs.T  # (B, N)
        if self.item_bias is not None:
            out = out + self.item_bias(items)[:, 0][None, :]
        return out

    def pair_logits(
        self, user_vecs: torch.Tensor, item_vecs: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        """Return the (B,) logits of row ``b``'s user and item: the diagonal of :meth:`logits`."""
        out = self.scale() * (user_vecs * item_vecs).sum(-1)  # (B,)
        if self.item_bias is not None:
            out = out + self.item_bias(items)[:, 0]
        return out


def save_model(model: TwoTower, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``model_config.json`` into ``directory``; return it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / MODEL_WEIGHTS))
    text = json.dumps(model.config.to_dict(), indent=2, sort_keys=True)
    (directory / MODEL_CONFIG).write_text(text + "\n")
    return directory


def load_model(directory: str | Path) -> TwoTower:
    """Return the model that :func:`save_model` wrote into ``directory``, in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = TwoTowerConfig.from_dict(json.loads((directory / MODEL_CONFIG).read_text()))
    model = TwoTower(config)
    model.load_state_dict(load_file(str(directory / MODEL_WEIGHTS)), strict=True)
    return model.eval()
