"""The vector of a user the bundle does not know, from the items they sent: the two-tower's
user tower run on that history, in numpy.

A pipeline bundle carries the two-tower model that made its vectors (the directory its serving
spec names, ``two_tower/``): a JSON config and safetensors weights. The server reads
both without torch and computes what :meth:`TwoTower.user_vectors
<slimrank.retrieval.two_tower.TwoTower.user_vectors>` computes for one bag of items, so a new
user's vector is the one a known user with the same history gets (``user_vectors.npy``), up to
float rounding, when the tower reads nothing but the history. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slimrank.bundle import Bundle, BundleError
from slimrank.bundle.formats import read_tensors_np
from slimrank.errors import IntegrityError
from slimrank.retrieval.two_tower_config import MODEL_CONFIG, MODEL_WEIGHTS, TwoTowerConfig

log = logging.getLogger(__name__)

HISTORY_TABLE = "user_tower.history.weight"
MLP_PREFIX = "user_tower.mlp."


class TowerModel(Protocol):
    """What :class:`HistoryEncoder` reads of a ``TwoTower`` (typed without importing torch)."""

    config: TwoTowerConfig

    def state_dict(self) -> Mapping[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Dense:
    """One ``nn.Linear`` of the tower's MLP: ``weight @ x + bias``."""

    weight: np.ndarray  # (out, in) float32
    bias: np.ndarray  # (out,) float32


def mlp_keys(config: TwoTowerConfig) -> list[tuple[str, str]]:
    """Return the (weight, bias) state-dict keys of the user tower's Linear layers, in order.

    :class:`~slimrank.retrieval.two_tower.MLP` is ``nn.Sequential`` of Linear, ReLU, Dropout
    per hidden size, then a last Linear: the Linear layers sit at indices 0, 3, 6, ...
    """
    n = len(config.hidden) + 1 if config.projection else 0
    return [(f"{MLP_PREFIX}{3 * i}.weight", f"{MLP_PREFIX}{3 * i}.bias") for i in range(n)]


def user_tower_parts(config: TwoTowerConfig) -> int:
    """Return how many (id_dim,) parts the user tower concatenates: id, features, history."""
    return int(config.use_user_id) + int(not config.user_features.empty) + int(config.use_history)


class HistoryEncoder:
    """Return the ``(d,)`` float32 vector the user tower gives a user who has the items sent.

    A new user has no user id and no user features: those parts of the tower are zero rows,
    so a tower without projection sums only the pooled history, and an MLP tower reads zeros
    in their places (its first layer sees only the history's columns). The history is pooled
    as the tower pools any (sum / n ** history_power of its own history table, the
    ``max_history`` last items when it keeps that many), run through the MLP (Linear, ReLU;
    dropout is off at inference), then L2-normalized if the tower normalizes; with
    ``item_bias`` a last column of 1 is added, as
    :func:`~slimrank.retrieval.embeddings.export_embeddings` exports user vectors.

    ``weights`` is the model's state dict as numpy arrays (only the user tower's are read);
    ``HistoryEncoder(model)`` takes them from an in-memory ``TwoTower`` (tests, tools; the
    server reads files with :func:`load_tower_encoder`). ``ValueError`` for a tower this class
    cannot compute or weights that do not fit the config. Read-only after construction, hence
    thread-safe.
    """

    def __init__(
        self, config: TwoTowerConfig | TowerModel, weights: Mapping[str, Any] | None = None
    ) -> None:
        if weights is None:
            if isinstance(config, TwoTowerConfig):
                raise TypeError("HistoryEncoder(config) needs the weights too")
            config, weights = config.config, _numpy_state(config)
        if not config.use_history:
            raise ValueError("the user tower pools no history: it cannot encode one")
        d = config.id_dim
        self._table = _weight(weights, HISTORY_TABLE, (config.n_items, d))  # (I, D)
        self._layers: list[Dense] = []
        in_dim = user_tower_parts(config) * d
        keys = mlp_keys(config)
        extra = sorted(
            k for k in weights if k.startswith(MLP_PREFIX) and k not in {n for p in keys for n in p}
        )
        if extra:
            raise ValueError(
                f"user tower MLP with layers {extra} is not the Linear/ReLU MLP of hidden "
                f"{config.hidden}: the numpy encoder cannot compute this tower variant"
            )
        for i, (w_key, b_key) in enumerate(keys):
            out_dim = config.hidden[i] if i < len(config.hidden) else config.dim
            weight = _weight(weights, w_key, (out_dim, in_dim))
            if i == 0:
                # The history is the last part; the id and feature parts are zeros for a new
                # user, so only the history's columns of the first layer count.
                weight = np.ascontiguousarray(weight[:, in_dim - d :])  # (out, D)
            self._layers.append(Dense(weight, _weight(weights, b_key, (out_dim,))))
            in_dim = out_dim
        self._power = np.float32(config.history_power)
        self._normalize = config.normalize
        self._item_bias = config.item_bias
        self.max_history = config.max_history
        self.n_items = config.n_items
        self.dim = config.dim + int(config.item_bias)

    def __call__(self, items: np.ndarray) -> np.ndarray:
        """Return the vector of a user whose history is ``items`` (h,), oldest first."""
        items = np.asarray(items, dtype=np.int64)
        if self.max_history:
            items = items[-self.max_history :]
        total = self._table[items].sum(axis=0, dtype=np.float32)  # (D,), 0 for no items
        out = total / np.float32(max(len(items), 1)) ** self._power  # (D,)
        for i, layer in enumerate(self._layers):
            if i:
                out = np.maximum(out, np.float32(0.0))  # the ReLU after each hidden Linear
            out = layer.weight @ out + layer.bias  # (out,)
        if self._normalize:  # F.normalize: x / max(||x||, 1e-12)
            out = out / max(np.float32(np.linalg.norm(out)), np.float32(1e-12))
        out = out.astype(np.float32, copy=False)  # (dim,)
        return np.append(out, np.float32(1.0)) if self._item_bias else out  # (d,)


def _numpy_state(model: TowerModel) -> dict[str, np.ndarray]:
    """Return the user tower's tensors of ``model`` as numpy arrays (torch is not imported)."""
    state = model.state_dict()
    keys = [k for k in state if k == HISTORY_TABLE or k.startswith(MLP_PREFIX)]
    return {k: state[k].detach().cpu().numpy() for k in keys}


def _weight(weights: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Return ``weights[key]`` as float32, ``ValueError`` if absent or not of ``shape``."""
    if key not in weights:
        raise ValueError(f"the weights have no {key!r}")
    value = np.asarray(weights[key])
    if value.shape != shape:
        raise ValueError(f"{key} has shape {value.shape}, the config says {shape}")
    return np.ascontiguousarray(value, dtype=np.float32)


def read_config(directory: str | Path) -> TwoTowerConfig:
    """Return the two-tower config that ``save_model`` wrote into ``directory``."""
    return TwoTowerConfig.from_dict(json.loads((Path(directory) / MODEL_CONFIG).read_text()))


def read_user_tower(directory: str | Path) -> dict[str, np.ndarray]:
    """Return the user tower's weights in ``directory``'s safetensors file as numpy arrays.

    Only the history table and the MLP are read (not the item tower, which can be the size of
    the catalog again); safetensors holds raw tensors, nothing is unpickled.
    """
    path = Path(directory) / MODEL_WEIGHTS
    try:
        return read_tensors_np(path, lambda k: k == HISTORY_TABLE or k.startswith(MLP_PREFIX))
    except IntegrityError as err:
        raise ValueError(str(err)) from None


def load_tower_encoder(directory: str | Path) -> HistoryEncoder | None:
    """Return the encoder of the model ``save_model`` wrote into ``directory``.

    None if its user tower pools no history; ``ValueError`` / ``OSError`` if it cannot be read
    or computed.
    """
    config = read_config(directory)
    if not config.use_history:
        return None
    return HistoryEncoder(config, read_user_tower(directory))


def load_history_encoder(bundle: Bundle, directory: str) -> HistoryEncoder | None:
    """Return the encoder of the two-tower model in ``directory`` of the bundle.

    None if the bundle does not list that model's files (bundles published before it did) or
    its user tower pools no history. ``BundleError`` if the model cannot be loaded.
    """
    names = (f"{directory}/{MODEL_CONFIG}", f"{directory}/{MODEL_WEIGHTS}")
    if not all(name in bundle.manifest.files for name in names):
        return None
    try:
        # Exactly these two files, which the bundle verified: JSON and safetensors.
        encoder = load_tower_encoder(bundle.file(names[0]).parent)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BundleError(f"bundle {bundle.version}: two-tower model: {err}") from err
    if encoder is None:
        log.info("bundle %s: the user tower pools no history", bundle.version)
    return encoder
