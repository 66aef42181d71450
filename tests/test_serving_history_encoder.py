"""The numpy HistoryEncoder against the torch two-tower it reads, on seeded random towers.

Each tower is written with ``save_model`` and read back by the server's loader (JSON config,
safetensors weights, no torch). The reference is torch: ``TwoTower.user_vectors`` of the same
model, with the parts a new user lacks (user id, user features) replaced by zero rows, and,
for towers that read only the history, ``export_embeddings`` (the code that wrote every known
user's vector).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch import nn

from slimrank.bundle import BundleError, open_bundle, publish
from slimrank.data.dataset import FeatureTable, Interactions
from slimrank.retrieval.embeddings import export_embeddings
from slimrank.retrieval.two_tower import (
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    FeatureSpec,
    TwoTower,
    TwoTowerConfig,
    UserHistory,
    save_model,
)
from slimrank.serving.history_encoder import (
    HistoryEncoder,
    load_history_encoder,
    load_tower_encoder,
)

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
    for module in model.modules():  # non-zero biases, so a dropped bias would show
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.bias, std=0.1)
    if model.item_bias is not None:
        nn.init.normal_(model.item_bias.weight, std=0.1)
    return model


def _encoder(model: TwoTower, directory: Path) -> HistoryEncoder:
    """Return the server's encoder of ``model``, read from the files ``save_model`` writes."""
    encoder = load_tower_encoder(save_model(model, directory))
    assert encoder is not None
    return encoder


def _bag(history: UserHistory, user: int) -> np.ndarray:
    """Return the user's items, oldest first."""
    return history.items[history.indptr[user] : history.indptr[user + 1]]


class ZeroPart(nn.Module):
    """A user-tower part a new user does not have (user id, user features): a zero (1, D) row."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("zeros", torch.zeros(1, dim), persistent=False)

    def forward(self, _inputs: object) -> torch.Tensor:
        return self.zeros


def torch_new_user_vector(model: TwoTower, items: np.ndarray) -> np.ndarray:
    """Return ``user_vectors`` of one user with history ``items``, no id and no features.

    Keeps the ``max_history`` last items, as UserHistory does, and appends the item-bias 1 as
    export_embeddings does.
    """
    config = model.config
    model = copy.deepcopy(model)
    tower = model.user_tower
    if tower.id_embedding is not None:
        tower.id_embedding = ZeroPart(config.id_dim)
    if tower.features is not None:
        tower.features = ZeroPart(config.id_dim)
    if config.max_history:
        items = items[-config.max_history :]
    bag = torch.as_tensor(np.asarray(items, dtype=np.int64))
    zero = torch.zeros(1, dtype=torch.int64)
    with torch.no_grad():
        out = model.user_vectors(zero, {}, bag, zero)[0].numpy()
    return np.append(out, np.float32(1.0)) if config.item_bias else out


def _feature_table() -> FeatureTable:
    rng = np.random.default_rng(1)
    return FeatureTable(
        n_rows=N_USERS,
        categorical={"gender": rng.integers(0, 3, N_USERS)},
        cardinality={"gender": 3},
        numeric={"age": rng.uniform(15, 70, N_USERS).astype(np.float32)},
    )


SPEC = FeatureSpec.from_table(_feature_table())

TOWERS = {
    "linear": {},
    "mlp": {"hidden": (16,)},
    "deep mlp, unnormalized, item bias": {
        "hidden": (16, 12),
        "normalize": False,
        "item_bias": True,
    },
    "mlp, sqrt pooling, max_history 3": {"hidden": (16,), "history_power": 0.5, "max_history": 3},
    "mlp, user id and features": {"hidden": (16,), "use_user_id": True, "user_features": SPEC},
    "linear, features, item bias, unnormalized": {
        "user_features": SPEC,
        "item_bias": True,
        "normalize": False,
    },
    "no projection": {"projection": False},
    "no projection, item bias, sqrt pooling, unnormalized": {
        "projection": False,
        "item_bias": True,
        "history_power": 0.5,
        "normalize": False,
    },
    "no projection, max_history 3": {"projection": False, "max_history": 3},
    "no projection, user id and features": {
        "projection": False,
        "use_user_id": True,
        "user_features": SPEC,
    },
}


@pytest.mark.parametrize("kwargs", TOWERS.values(), ids=TOWERS.keys())
def test_the_numpy_encoder_equals_the_torch_user_tower(
    kwargs: dict, tmp_path: Path, one_torch_thread: None
) -> None:
    model = _model(**kwargs)
    encoder = _encoder(model, tmp_path)
    config = model.config
    assert (encoder.n_items, encoder.max_history) == (N_ITEMS, config.max_history)
    assert encoder.dim == config.dim + int(config.item_bias)
    history = _history()  # every item; the encoder keeps the last max_history
    for user in range(N_USERS):
        items = _bag(history, user)
        got = encoder(items)
        assert got.dtype == np.float32 and got.shape == (encoder.dim,)
        np.testing.assert_allclose(got, torch_new_user_vector(model, items), rtol=1e-5, atol=1e-6)
    empty = np.zeros(0, dtype=np.int64)  # pools to zeros: the MLP's biases alone
    np.testing.assert_allclose(encoder(empty), torch_new_user_vector(model, empty), atol=1e-6)


HISTORY_ONLY = {name: kw for name, kw in TOWERS.items() if "user id" not in name}
HISTORY_ONLY = {name: kw for name, kw in HISTORY_ONLY.items() if "features" not in name}


@pytest.mark.parametrize("kwargs", HISTORY_ONLY.values(), ids=HISTORY_ONLY.keys())
def test_a_history_only_tower_gives_the_exported_vector_of_that_history(
    kwargs: dict, tmp_path: Path, one_torch_thread: None
) -> None:
    model = _model(**kwargs)
    history = _history(model.config.max_history)
    user_vecs, _ = export_embeddings(model, history)  # (U, d)
    encoder = _encoder(model, tmp_path)
    full = _history(0)  # the request sends every item; the encoder keeps the last max_history
    for user in range(N_USERS):
        np.testing.assert_allclose(encoder(_bag(full, user)), user_vecs[user], rtol=1e-5, atol=1e-6)


def test_an_in_memory_model_gives_the_encoder_its_files_give(tmp_path: Path) -> None:
    model = _model(hidden=(16,), use_user_id=True, user_features=SPEC, max_history=3)
    from_files, in_memory = _encoder(model, tmp_path), HistoryEncoder(model)
    for user in range(N_USERS):
        items = _bag(_history(), user)
        np.testing.assert_array_equal(in_memory(items), from_files(items))
    with pytest.raises(TypeError, match="needs the weights"):
        HistoryEncoder(model.config)


def test_the_id_and_features_a_new_user_lacks_count_for_known_users(
    tmp_path: Path, one_torch_thread: None
) -> None:
    """The zero rows are a real difference: with them, known users' vectors would be others."""
    model = _model(hidden=(16,), use_user_id=True, user_features=SPEC)
    history = _history()
    with_features, _ = export_embeddings(model, history, user_features=_feature_table())
    encoder = _encoder(model, tmp_path)
    got = np.stack([encoder(_bag(history, user)) for user in range(N_USERS)])
    assert np.abs(got - with_features).max() > 1e-2


def test_a_tower_that_pools_no_history_has_no_encoder(tmp_path: Path) -> None:
    model = _model(use_history=False, use_user_id=True)
    assert load_tower_encoder(save_model(model, tmp_path)) is None
    with pytest.raises(ValueError, match="pools no history"):
        HistoryEncoder(model.config, {})


def test_every_two_tower_field_is_one_the_encoder_accounts_for() -> None:
    """A new TwoTowerConfig field may change the user tower: the numpy encoder must know it."""
    reads = {"n_items", "dim", "id_dim", "hidden", "projection", "use_user_id", "use_history"}
    reads |= {"max_history", "history_power", "normalize", "item_bias", "user_features"}
    # Training-only, item-tower or shape fields that do not change a new user's vector.
    ignores = {"n_users", "dropout", "use_item_id", "temperature", "learn_temperature"}
    ignores |= {"init_std", "item_features"}
    assert {f.name for f in dataclasses.fields(TwoTowerConfig)} == reads | ignores


def _bundle_with(tmp_path: Path, model_dir: Path) -> tuple[Path, str]:
    files = {f"two_tower/{name}": model_dir / name for name in (MODEL_CONFIG, MODEL_WEIGHTS)}
    root = tmp_path / "bundles"
    return root, publish(root, files)


def test_the_bundle_loader_reads_the_verified_model(tmp_path: Path) -> None:
    model = _model(hidden=(16,))
    root, version = _bundle_with(tmp_path, save_model(model, tmp_path / "model"))
    encoder = load_history_encoder(open_bundle(root, version), "two_tower")
    assert encoder is not None
    items = np.array([3, 1, 4])
    np.testing.assert_allclose(encoder(items), torch_new_user_vector(model, items), atol=1e-6)
    assert load_history_encoder(open_bundle(root, version), "elsewhere") is None


def test_a_bundle_listing_only_part_of_the_model_has_no_encoder(tmp_path: Path) -> None:
    """Both files must be in the manifest (verified): a config alone is no model to load."""
    model_dir = save_model(_model(hidden=(16,)), tmp_path / "model")
    root = tmp_path / "bundles"
    version = publish(root, {f"two_tower/{MODEL_CONFIG}": model_dir / MODEL_CONFIG})
    assert load_history_encoder(open_bundle(root, version), "two_tower") is None


def test_a_tower_the_encoder_cannot_compute_is_a_bundle_error_naming_it(tmp_path: Path) -> None:
    model_dir = save_model(_model(hidden=(16,)), tmp_path / "model")
    weights = {k: v.numpy() for k, v in _model(hidden=(16,)).state_dict().items()}
    weights["user_tower.mlp.4.weight"] = np.zeros((16, 16), np.float32)  # a layer it does not know
    save_file(weights, str(model_dir / MODEL_WEIGHTS))
    root, version = _bundle_with(tmp_path, model_dir)
    with pytest.raises(BundleError, match=r"user_tower\.mlp\.4\.weight.*cannot compute"):
        load_history_encoder(open_bundle(root, version), "two_tower")


@pytest.mark.parametrize(
    "change",
    [
        {"activation": "gelu"},  # a config field this server does not know
        {"id_dim": 4},  # weights that do not fit the config
    ],
    ids=["unknown field", "wrong shape"],
)
def test_a_config_the_weights_do_not_fit_is_a_bundle_error(tmp_path: Path, change: dict) -> None:
    model_dir = save_model(_model(hidden=(16,)), tmp_path / "model")
    config = {**json.loads((model_dir / MODEL_CONFIG).read_text()), **change}
    (model_dir / MODEL_CONFIG).write_text(json.dumps(config))
    root, version = _bundle_with(tmp_path, model_dir)
    with pytest.raises(BundleError, match=r"two-tower model: .*(activation|shape)"):
        load_history_encoder(open_bundle(root, version), "two_tower")
