"""HistoryEncoder against the two-tower's own export of user vectors, on seeded random towers.

The reference for towers that read only the history is ``export_embeddings`` (the code that
wrote every known user's vector); for towers that also read a user id or user features it is
the same weights with those parts left out (projection-free: the sum of the remaining parts)
or zero rows in their place before the MLP, written out here by hand.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimrank.data.dataset import FeatureTable, Interactions
from slimrank.retrieval.embeddings import export_embeddings
from slimrank.retrieval.two_tower import FeatureSpec, TwoTower, TwoTowerConfig, UserHistory
from slimrank.serving.history_encoder import HistoryEncoder

N_USERS, N_ITEMS = 30, 40


def _history(max_history: int = 0, seed: int = 0) -> UserHistory:
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(N_USERS), rng.integers(1, 12, N_USERS))  # every user has items
    item = rng.integers(0, N_ITEMS, len(user))
    ts = rng.permutation(len(user))
    inter = Interactions(user, item, np.ones(len(user), np.float32), ts)
    return UserHistory.from_interactions(inter, N_USERS, max_history)


def _model(seed: int = 0, **kwargs) -> TwoTower:
    torch.manual_seed(seed)
    fields = {"n_users": N_USERS, "n_items": N_ITEMS, "dim": 8, "id_dim": 8, "init_std": 0.1}
    model = TwoTower(TwoTowerConfig(**{**fields, **kwargs})).eval()
    if model.item_bias is not None:
        torch.nn.init.normal_(model.item_bias.weight, std=0.1)
    return model


def _bag(history: UserHistory, user: int, full: UserHistory | None = None) -> np.ndarray:
    """Return the user's items oldest first (from ``full`` when given: before max_history)."""
    source = full or history
    return source.items[source.indptr[user] : source.indptr[user + 1]]


HISTORY_ONLY = {
    "mlp tower": {"hidden": (16,)},
    "linear tower": {},
    "no projection": {"projection": False},
    "no projection, item bias, sqrt pooling, unnormalized": {
        "projection": False,
        "item_bias": True,
        "history_power": 0.5,
        "normalize": False,
    },
    "mlp tower, item bias": {"hidden": (16,), "item_bias": True},
    "max_history 3": {"projection": False, "max_history": 3},
}


@pytest.mark.parametrize("kwargs", HISTORY_ONLY.values(), ids=HISTORY_ONLY.keys())
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "torch"])
def test_a_history_only_tower_gives_the_exported_vector_of_that_history(
    kwargs: dict, fast: bool, one_torch_thread: None
) -> None:
    model = _model(**kwargs)
    history = _history(model.config.max_history)
    user_vecs, _ = export_embeddings(model, history)  # (U, d)
    encoder = HistoryEncoder(copy.deepcopy(model), fast=fast)
    assert encoder.dim == user_vecs.shape[1]
    full = _history(0)  # the request sends every item; the encoder keeps the last max_history
    for user in range(N_USERS):
        got = encoder(_bag(history, user, full))
        assert got.dtype == np.float32 and got.shape == (encoder.dim,)
        np.testing.assert_allclose(got, user_vecs[user], rtol=1e-5, atol=1e-6)


def _feature_table() -> FeatureTable:
    rng = np.random.default_rng(1)
    return FeatureTable(
        n_rows=N_USERS,
        categorical={"gender": rng.integers(0, 3, N_USERS)},
        cardinality={"gender": 3},
        numeric={"age": rng.uniform(15, 70, N_USERS).astype(np.float32)},
    )


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "torch"])
def test_a_projection_free_tower_leaves_out_the_id_and_features_a_new_user_lacks(
    fast: bool, one_torch_thread: None
) -> None:
    spec = FeatureSpec.from_table(_feature_table())
    full = _model(projection=False, use_user_id=True, user_features=spec, item_bias=True)
    # The reference: the same history table in a tower that reads nothing else.
    plain = _model(projection=False, item_bias=True)
    assert not plain.load_state_dict(full.state_dict(), strict=False).missing_keys
    history = _history()
    want, _ = export_embeddings(plain, history)
    with_features, _ = export_embeddings(full, history, user_features=_feature_table())
    encoder = HistoryEncoder(copy.deepcopy(full), fast=fast)
    for user in range(N_USERS):
        np.testing.assert_allclose(encoder(_bag(history, user)), want[user], atol=1e-6)
    assert np.abs(want - with_features).max() > 1e-2  # the features did count for known users


def test_an_mlp_tower_reads_zeros_for_the_id_and_features_a_new_user_lacks(
    one_torch_thread: None,
) -> None:
    spec = FeatureSpec.from_table(_feature_table())
    model = _model(hidden=(16,), use_user_id=True, user_features=spec)
    history = _history()
    encoder = HistoryEncoder(copy.deepcopy(model))
    for user in (0, 7, 29):
        items = _bag(history, user)
        with torch.no_grad():
            pooled = model.user_tower.history.weight[items].mean(0, keepdim=True)  # (1, D)
            parts = [torch.zeros(1, 8), torch.zeros(1, 8), pooled]  # id, features, history
            want = F.normalize(model.user_tower.mlp(torch.cat(parts, dim=1)), dim=-1)[0]
        np.testing.assert_allclose(encoder(items), want.numpy(), rtol=1e-5, atol=1e-6)


def test_the_fast_path_is_numpy_only_for_towers_without_projection() -> None:
    assert HistoryEncoder(_model(projection=False))._table is not None
    assert HistoryEncoder(_model(hidden=(16,)))._table is None
    assert HistoryEncoder(_model(projection=False), fast=False)._table is None


def test_a_tower_that_pools_no_history_cannot_encode_one() -> None:
    with pytest.raises(ValueError, match="pools no history"):
        HistoryEncoder(_model(use_history=False, use_user_id=True))
