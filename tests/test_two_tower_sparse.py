"""Sparse embedding gradients + SparseAdam for the two-tower: what makes training scale with the
batch, not the catalog, checked against dense AdamW on a small seeded world."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimrank.config import FieldError
from slimrank.data.dataset import Interactions, split_random
from slimrank.data.world import WorldConfig, iter_interactions
from slimrank.retrieval.train import (
    TrainConfig,
    make_optimizer,
    sampled_softmax_loss,
    train_two_tower,
)
from slimrank.retrieval.two_tower import TwoTower, TwoTowerConfig

WORLD = WorldConfig(n_users=1_500, n_items=600, per_user=15, pool_per_genre=40, seed=1)


@pytest.fixture(scope="module")
def split():
    cols = next(iter_interactions(WORLD, chunk_users=WORLD.n_users))
    users = np.unique(cols["user_id"], return_inverse=True)[1]
    items_ids, items = np.unique(cols["item_id"], return_inverse=True)
    n = len(users)
    logs = Interactions(users, items, np.ones(n, np.float32), cols["timestamp"])
    return split_random(logs, int(users.max()) + 1, len(items_ids), seed=0)


def scale_like(split) -> TwoTowerConfig:
    """The shape configs/scale.toml trains: id + history tables, no MLP, item bias."""
    return TwoTowerConfig(
        n_users=split.n_users,
        n_items=split.n_items,
        dim=16,
        id_dim=16,
        projection=False,
        normalize=False,
        item_bias=True,
        history_power=0.5,
        init_std=0.01,
        temperature=1.0,
    )


def train_config(optimizer: str, **kwargs) -> TrainConfig:
    fields = {
        "epochs": 4,
        "batch_size": 512,
        "lr": 3e-3,
        "weight_decay": 0.0,
        "loss": "sampled_softmax",
        "examples": "leave_one_out",
        "history_dropout": 0.5,
        "patience": 4,
        "seed": 0,
        "progress": False,
        "optimizer": optimizer,
    }
    return TrainConfig(**{**fields, **kwargs})


def test_sparse_adam_trains_as_well_as_dense_adamw(split) -> None:
    dense = train_two_tower(scale_like(split), train_config("adamw"), split)
    sparse = train_two_tower(scale_like(split), train_config("sparse_adam"), split)
    assert sparse.log[-1]["loss"] < sparse.log[0]["loss"]
    # The reference is dense AdamW on the same data, seed and epochs.
    assert sparse.best_valid["recall@10"] >= 0.95 * dense.best_valid["recall@10"]
    assert sparse.best_valid["ndcg@10"] >= 0.95 * dense.best_valid["ndcg@10"]


def _one_step(model: TwoTower, optimizer, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items = model.config.n_users, model.config.n_items
    users = torch.as_tensor(rng.integers(0, n_users, 32))
    items = torch.as_tensor(rng.integers(0, n_items, 32))
    bag = torch.as_tensor(rng.integers(0, n_items, 32 * 4))
    sums, counts = model.user_tower.pool(bag, torch.arange(0, 32 * 4, 4))
    u = model.user_vectors_pooled(users, None, model.pool_scale(sums, counts))
    v = model.item_vectors(items)
    loss = sampled_softmax_loss(model.logits(u, v, items), items)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_sparse_gradients_touch_only_the_batch_rows_and_match_adam_on_the_first_step() -> None:
    config = TwoTowerConfig(
        n_users=500, n_items=400, dim=8, id_dim=8, projection=False, item_bias=True, init_std=0.1
    )
    torch.manual_seed(0)
    dense, sparse = TwoTower(config), TwoTower(config)
    sparse.load_state_dict(dense.state_dict())
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    dense_opt = make_optimizer(dense, train_config("adamw", lr=0.01))
    sparse_opt = make_optimizer(sparse, train_config("sparse_adam", lr=0.01))
    _one_step(dense, dense_opt)
    _one_step(sparse, sparse_opt)
    table = sparse.item_tower.id_embedding.weight
    assert table.grad is not None and table.grad.is_sparse
    # Adam's first step is -lr * g / (|g| + eps) for either optimizer: the same weights, up to
    # where eps enters (SparseAdam adds it before the bias correction: eps / sqrt(1 - beta2),
    # which moves the step of a gradient near 3e-5 by ~1% of lr).
    for name, value in sparse.state_dict().items():
        torch.testing.assert_close(value, dense.state_dict()[name], rtol=0, atol=0.02 * 0.01)
    # Rows outside the batch are left bit for bit.
    used = torch.zeros(400, dtype=torch.bool)
    used[table.grad.coalesce().indices()[0]] = True
    key = "item_tower.id_embedding.weight"
    assert torch.equal(sparse.state_dict()[key][~used], before[key][~used])
    assert not torch.equal(sparse.state_dict()[key][used], before[key][used])


def test_the_dense_optimizer_still_builds_dense_gradients() -> None:
    config = TwoTowerConfig(n_users=50, n_items=40, dim=8, id_dim=8, projection=False)
    model = TwoTower(config)
    _one_step(model, make_optimizer(model, train_config("adamw")))
    assert not model.item_tower.id_embedding.weight.grad.is_sparse


def test_sparse_adam_with_weight_decay_is_rejected_naming_the_field() -> None:
    with pytest.raises(FieldError, match="weight_decay"):
        train_config("sparse_adam", weight_decay=0.01)
    with pytest.raises(FieldError, match="optimizer"):
        train_config("sgd")
