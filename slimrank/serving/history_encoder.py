"""The vector of a user the bundle does not know, from the items they sent: the two-tower's
user tower run on that history.

A pipeline bundle carries the two-tower model that made its vectors (``two_tower/``, see
:mod:`slimrank.pipeline.publish`). :class:`HistoryEncoder` runs that model's own user-tower
code (:meth:`TwoTower.user_vectors`) on one bag of item rows, so a new user's vector is the
one a known user with the same history gets (``user_vectors.npy``), up to float rounding,
when the tower reads nothing but the history.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from slimrank.bundle import Bundle, BundleError
from slimrank.retrieval.two_tower import MODEL_CONFIG, MODEL_WEIGHTS, TwoTower, load_model

log = logging.getLogger(__name__)


class AbsentPart(nn.Module):
    """A user-tower part a new user does not have (user id, user features): a zero (1, D) row."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("zeros", torch.zeros(1, dim), persistent=False)

    def forward(self, _inputs: object) -> torch.Tensor:
        return self.zeros  # (1, D)


class HistoryEncoder:
    """Return the ``(d,)`` float32 vector the user tower gives a user who has the items sent.

    A new user has no user id and no user features: those parts of the tower are zero rows,
    so a tower without projection sums only the pooled history, and an MLP tower reads zeros
    in their places. The history is pooled as the tower pools any (sum / n ** history_power
    of its own history table, the ``max_history`` last items when it keeps that many), then
    L2-normalized if the tower normalizes; with ``item_bias`` a last column of 1 is added, as
    :func:`~slimrank.retrieval.embeddings.export_embeddings` exports user vectors.

    A tower without projection is computed in numpy from its history table (about 20 us a
    call against about 200 us for torch's dispatch through the tower on one bag); ``fast=False``
    always runs the torch tower, the reference the numpy path is tested against. Takes over
    ``model`` (its id and feature parts are replaced); thread-safe afterwards.
    """

    def __init__(self, model: TwoTower, fast: bool = True) -> None:
        config = model.config
        if not config.use_history:
            raise ValueError("the user tower pools no history: it cannot encode one")
        tower = model.user_tower
        if tower.id_embedding is not None:
            tower.id_embedding = AbsentPart(config.id_dim)
        if tower.features is not None:
            tower.features = AbsentPart(config.id_dim)
        self._model = model.eval()
        self._config = config
        # (I, D) float32: a projection-free tower's output is the sum of its parts, here the
        # pooled history alone.
        self._table = None
        if fast and not config.projection:
            self._table = tower.history.weight.detach().numpy().astype(np.float32)
        self._item_bias = config.item_bias
        self.max_history = config.max_history
        self.n_items = config.n_items
        self.dim = config.dim + int(config.item_bias)
        self._users = torch.zeros(1, dtype=torch.int64)  # (1,) read by no part
        self._offsets = torch.zeros(1, dtype=torch.int64)  # (1,) one bag

    def __call__(self, items: np.ndarray) -> np.ndarray:
        """Return the vector of a user whose history is ``items`` (h,), oldest first."""
        items = np.asarray(items, dtype=np.int64)
        if self.max_history:
            items = items[-self.max_history :]
        if self._table is None:
            bag = torch.from_numpy(np.ascontiguousarray(items))  # (h,)
            with torch.inference_mode():
                vector = self._model.user_vectors(self._users, {}, bag, self._offsets)[0]
            out = vector.numpy().astype(np.float32)  # (dim,)
        else:
            out = self._pool(items)
        return np.append(out, np.float32(1.0)) if self._item_bias else out  # (d,)

    def _pool(self, items: np.ndarray) -> np.ndarray:
        """Return a projection-free tower's (dim,) output, as TwoTower.user_vectors computes it."""
        total = self._table[items].sum(axis=0, dtype=np.float32)  # (D,)
        out = total / np.float32(max(len(items), 1)) ** np.float32(self._config.history_power)
        if self._config.normalize:  # F.normalize: x / max(||x||, 1e-12)
            out = out / max(np.float32(np.linalg.norm(out)), np.float32(1e-12))
        return out.astype(np.float32)


def load_history_encoder(bundle: Bundle, directory: str) -> HistoryEncoder | None:
    """Return the encoder of the two-tower model in ``directory`` of the bundle.

    None if the bundle does not list that model's files (bundles published before it did) or
    its user tower pools no history. ``BundleError`` if the model cannot be loaded.
    """
    names = (f"{directory}/{MODEL_CONFIG}", f"{directory}/{MODEL_WEIGHTS}")
    if not all(name in bundle.manifest.files for name in names):
        return None
    try:
        # load_model reads exactly these two files, which the bundle verified: a JSON config
        # and safetensors weights, nothing unpickled.
        model = load_model(bundle.file(names[0]).parent)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise BundleError(f"bundle {bundle.version}: two-tower model: {err}") from err
    if not model.config.use_history:
        log.info("bundle %s: the user tower pools no history", bundle.version)
        return None
    return HistoryEncoder(model)
