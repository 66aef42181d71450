"""The two-tower model, its inputs and its files, on small hand-made data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimrank.data.dataset import FeatureTable, Interactions, Split
from slimrank.retrieval.embeddings import (
    Embeddings,
    export_embeddings,
    history_for,
    load_embeddings,
    save_embeddings,
)
from slimrank.retrieval.train import TrainConfig, bpr_loss, sampled_softmax_loss
from slimrank.retrieval.two_tower import (
    FeatureSpec,
    TwoTower,
    TwoTowerConfig,
    UserHistory,
    bag_rows,
    feature_tensors,
    load_model,
    save_model,
    take_rows,
)


def interactions(user, item, timestamp=None) -> Interactions:
    n = len(user)
    ts = np.arange(n) if timestamp is None else timestamp
    return Interactions(np.array(user), np.array(item), np.ones(n, np.float32), np.array(ts))


def tables(n_users: int, n_items: int, seed: int = 0) -> tuple[FeatureTable, FeatureTable]:
    rng = np.random.default_rng(seed)
    users = FeatureTable(
        n_rows=n_users,
        categorical={"gender": rng.integers(0, 3, n_users)},
        cardinality={"gender": 3},
        numeric={"age": rng.uniform(15, 70, n_users).astype(np.float32)},
    )
    items = FeatureTable(
        n_rows=n_items,
        numeric={"year": rng.uniform(1950, 2000, n_items).astype(np.float32)},
        multi_hot={"genre": (rng.random((n_items, 4)) < 0.3).astype(np.float32)},
    )
    return users, items


def featured_config(n_users: int, n_items: int, **kwargs) -> TwoTowerConfig:
    users, items = tables(n_users, n_items)
    fields = {
        "n_users": n_users,
        "n_items": n_items,
        "dim": 8,
        "id_dim": 8,
        "hidden": (16,),
        "user_features": FeatureSpec.from_table(users),
        "item_features": FeatureSpec.from_table(items),
    }
    return TwoTowerConfig(**{**fields, **kwargs})


def test_history_keeps_the_most_recent_items_oldest_first():
    logs = interactions(
        user=[0, 1, 0, 0, 2, 0],
        item=[5, 7, 3, 9, 1, 4],
        timestamp=[30, 5, 10, 40, 1, 20],
    )
    full = UserHistory.from_interactions(logs, n_users=4)
    assert full.items[full.indptr[0] : full.indptr[1]].tolist() == [3, 4, 5, 9]
    assert full.lengths(np.arange(4)).tolist() == [4, 1, 1, 0]
    recent = UserHistory.from_interactions(logs, n_users=4, max_history=2)
    assert recent.items[recent.indptr[0] : recent.indptr[1]].tolist() == [5, 9]
    assert recent.lengths(np.arange(4)).tolist() == [2, 1, 1, 0]

    items, offsets = full.bags(np.array([3, 0, 1]))
    assert items.tolist() == [3, 4, 5, 9, 7]
    assert offsets.tolist() == [0, 0, 4]
    assert bag_rows(offsets, len(items)).tolist() == [1, 1, 1, 1, 2]


def test_history_dropout_drops_about_that_share_and_keeps_bags_aligned():
    rng = np.random.default_rng(0)
    logs = interactions(user=np.repeat(np.arange(50), 40), item=np.tile(np.arange(40), 50))
    history = UserHistory.from_interactions(logs, n_users=50)
    items, offsets = history.bags(np.arange(50), drop=0.5, rng=rng)
    assert 0.4 < len(items) / 2000 < 0.6
    rows = bag_rows(offsets, len(items))
    # Within a bag the kept items stay in time order: strictly increasing here.
    assert np.all((np.diff(items) > 0) | (np.diff(rows) > 0))
    # ``drop`` is the share removed, not the share kept (0.5 could not tell them apart).
    kept, _ = history.bags(np.arange(50), drop=0.25, rng=np.random.default_rng(1))
    assert 0.7 < len(kept) / 2000 < 0.8
    with pytest.raises(ValueError, match="rng"):
        history.bags(np.arange(3), drop=0.5)


def test_history_for_test_view_adds_the_validation_items():
    split = Split(
        train=interactions([0, 0, 1], [1, 2, 3]),
        valid=interactions([0], [4]),
        test=interactions([1], [5]),
        n_users=2,
        n_items=6,
    )
    valid = history_for(split, "valid")
    test = history_for(split, "test")
    assert sorted(valid.items[valid.indptr[0] : valid.indptr[1]]) == [1, 2]
    assert sorted(test.items[test.indptr[0] : test.indptr[1]]) == [1, 2, 4]
    with pytest.raises(ValueError, match="view"):
        history_for(split, "train")


def test_test_view_history_keeps_the_most_recent_train_and_valid_items():
    """The test view orders train + valid items by timestamp (not rating) and keeps the
    ``max_history`` latest."""
    split = Split(
        train=Interactions(
            np.array([0, 0, 0]),
            np.array([1, 2, 3]),
            np.array([5.0, 1.0, 3.0]),
            np.array([10, 40, 20]),
        ),
        valid=Interactions(np.array([0]), np.array([4]), np.array([2.0]), np.array([30])),
        test=interactions([0], [5]),
        n_users=1,
        n_items=6,
    )
    full = history_for(split, "test")
    assert full.items.tolist() == [1, 3, 4, 2]  # times 10, 20, 30, 40
    recent = history_for(split, "test", max_history=2)
    assert recent.items.tolist() == [4, 2]
    assert history_for(split, "valid", max_history=2).items.tolist() == [3, 2]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dim": 0}, "dim"),
        ({"id_dim": -1}, "id_dim"),
        ({"hidden": (8, 0)}, "hidden"),
        ({"dropout": 1.0}, "dropout"),
        ({"temperature": 0.0}, "temperature"),
        ({"max_history": -2}, "max_history"),
        ({"history_power": 1.5}, "history_power"),
        ({"n_items": 0}, "n_items"),
        ({"use_user_id": False, "use_history": False}, "use_user_id"),
        ({"use_item_id": False}, "use_item_id"),
        ({"init_std": -0.1}, "init_std"),
        ({"projection": False, "hidden": (8,)}, "projection"),
        ({"projection": False, "id_dim": 32}, "projection"),
    ],
)
def test_model_config_errors_name_the_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=rf"TwoTowerConfig\.{field}=") as err:
        TwoTowerConfig(**{"n_users": 3, "n_items": 4, **kwargs})
    assert repr(next(iter(kwargs.values()))) in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"loss": "hinge"}, "loss"),
        ({"history_dropout": 1.0}, "history_dropout"),
        ({"history_dropout": 0.1, "examples": "masked"}, "history_dropout"),
        ({"patience": 0}, "patience"),
        ({"examples": "all"}, "examples"),
        ({"examples": "masked", "loss": "bpr"}, "loss"),
        ({"examples": "multinomial", "loss": "sampled_softmax"}, "loss"),
        ({"mask_share": 1.0}, "mask_share"),
        ({"eval_every": 0}, "eval_every"),
        ({"k": 0}, "k"),
        ({"threads": 0}, "threads"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"members": 0}, "members"),
    ],
)
def test_train_config_errors_name_the_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}="):
        TrainConfig(**kwargs)


def test_feature_spec_checks_and_config_round_trips_through_a_dict():
    with pytest.raises(ValueError, match=r"FeatureSpec\.numeric_std="):
        FeatureSpec(numeric_mean={"age": 1.0}, numeric_std={"age": 0.0})
    with pytest.raises(ValueError, match=r"FeatureSpec\.categorical="):
        FeatureSpec(categorical={"gender": 0})
    config = featured_config(5, 7, max_history=3, hidden=(16, 8))
    again = TwoTowerConfig.from_dict(config.to_dict())
    assert again == config
    assert again.user_features.categorical == {"gender": 3}
    assert again.item_features.multi_hot == {"genre": 4}


def test_constant_numeric_column_standardizes_to_zero():
    table = FeatureTable(n_rows=3, numeric={"x": np.full(3, 5.0, np.float32)})
    spec = FeatureSpec.from_table(table)
    assert spec.numeric_std == {"x": 1.0}
    assert spec.numeric_mean == {"x": 5.0}


def test_numeric_features_are_standardized_by_the_population_std():
    """The spec holds each numeric column's mean and population std; the encoder feeds
    (x - mean) / std to its dense layer, added to the categorical embeddings."""
    table = FeatureTable(
        n_rows=4,
        categorical={"gender": np.array([0, 2, 1, 2])},
        cardinality={"gender": 3},
        numeric={"age": np.array([1.0, 2.0, 3.0, 6.0], np.float32)},
    )
    spec = FeatureSpec.from_table(table)
    assert spec.numeric_mean == {"age": 3.0}
    assert spec.numeric_std["age"] == pytest.approx(np.sqrt(3.5))  # (4 + 1 + 0 + 9) / 4
    torch.manual_seed(0)
    model = TwoTower(TwoTowerConfig(n_users=4, n_items=2, dim=3, id_dim=3, user_features=spec))
    encoder = model.user_tower.features
    with torch.no_grad():
        got = encoder(feature_tensors(table, spec)).numpy()
    emb = encoder.embeddings[0].weight.detach().numpy()
    w = encoder.dense.weight.detach().numpy()[:, 0]
    b = encoder.dense.bias.detach().numpy()
    z = (np.array([1.0, 2.0, 3.0, 6.0]) - 3.0) / np.sqrt(3.5)
    want = emb[[0, 2, 1, 2]] + z[:, None] * w[None, :] + b[None, :]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_exported_user_vector_is_the_tower_output_on_the_mean_history():
    torch.manual_seed(0)
    users, items = tables(4, 6)
    config = featured_config(4, 6)
    model = TwoTower(config).eval()
    logs = interactions(user=[2, 2, 2, 0], item=[1, 4, 5, 3])
    user_vecs, item_vecs = export_embeddings(
        model, UserHistory.from_interactions(logs, 4), users, items
    )
    assert user_vecs.shape == (4, 8) and item_vecs.shape == (6, 8)
    assert user_vecs.dtype == np.float32 and item_vecs.dtype == np.float32
    ufeat = feature_tensors(users, config.user_features)
    ifeat = feature_tensors(items, config.item_features)
    with torch.no_grad():
        # Reference: the mean of the user's history rows, by hand, through the tower.
        pooled = model.user_tower.history.weight[[1, 4, 5]].mean(0, keepdim=True)  # (1, D)
        expected = model.user_vectors_pooled(
            torch.tensor([2]), take_rows(ufeat, torch.tensor([2])), pooled
        )
        # A user without history pools zeros.
        empty = model.user_vectors_pooled(
            torch.tensor([1]), take_rows(ufeat, torch.tensor([1])), torch.zeros(1, 8)
        )
        item_expected = model.item_vectors(torch.arange(6), ifeat)
    np.testing.assert_allclose(user_vecs[2], expected[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(user_vecs[1], empty[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(item_vecs, item_expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(user_vecs, axis=1), 1.0, rtol=1e-5)


def test_export_in_batches_and_of_a_user_sample_reads_each_users_own_features():
    """Batches of 2 and a sample [3, 1] give the rows of one whole-batch export: each user's
    feature row goes with that user."""
    torch.manual_seed(2)
    users, items = tables(5, 6)
    model = TwoTower(featured_config(5, 6))
    history = UserHistory.from_interactions(interactions([0, 1, 3, 3, 4], [1, 2, 0, 5, 4]), 5)
    whole, _ = export_embeddings(model, history, users, items, batch_size=64)
    assert len(np.unique(whole.round(5), axis=0)) == 5
    batched, _ = export_embeddings(model, history, users, items, batch_size=2)
    np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-6)
    sample, _ = export_embeddings(model, history, users, items, users=np.array([3, 1]))
    np.testing.assert_allclose(sample, whole[[3, 1]], rtol=1e-5, atol=1e-6)


def test_export_needs_what_the_model_reads():
    users, items = tables(4, 6)
    model = TwoTower(featured_config(4, 6))
    history = UserHistory.from_interactions(interactions([0], [1]), 4)
    with pytest.raises(ValueError, match="history"):
        export_embeddings(model, None, users, items)
    with pytest.raises(ValueError, match="user_features"):
        export_embeddings(model, history, None, items)
    with pytest.raises(ValueError, match="rows"):
        export_embeddings(model, history, users, tables(4, 5)[1])
    with pytest.raises(ValueError, match="rows"):  # a longer table is another catalog too
        export_embeddings(model, history, users, tables(4, 7)[1])


def test_save_load_round_trip_gives_identical_embeddings(tmp_path):
    torch.manual_seed(1)
    users, items = tables(5, 7)
    config = featured_config(5, 7, learn_temperature=True, use_user_id=True, item_bias=True)
    model = TwoTower(config)
    with torch.no_grad():
        model.log_scale.fill_(2.5)
        model.item_bias.weight.normal_()
    history = UserHistory.from_interactions(interactions([0, 0, 3], [1, 6, 2]), 5)
    before = export_embeddings(model, history, users, items)
    loaded = load_model(save_model(model, tmp_path / "model"))
    after = export_embeddings(loaded, history, users, items)
    assert loaded.config == model.config
    assert float(loaded.scale().detach()) == pytest.approx(float(np.exp(2.5)))
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert not list((tmp_path / "model").glob("*.pt"))


def test_load_refuses_weights_that_do_not_fit_the_config(tmp_path):
    """A config naming a part the weights lack (here an item bias) is an error, not a model
    whose missing part keeps its fresh initialization."""
    import json

    directory = save_model(TwoTower(TwoTowerConfig(n_users=3, n_items=5, dim=4)), tmp_path / "m")
    path = directory / "model_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "item_bias": True}))
    with pytest.raises(RuntimeError, match="item_bias"):
        load_model(directory)


def test_embedding_files_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    saved = Embeddings(
        user=rng.normal(size=(3, 4)).astype(np.float32),
        item=rng.normal(size=(5, 4)).astype(np.float32),
        user_ids=np.array(["u1", "u2", "u3"], dtype=object),
        item_ids=np.array(["10", "20", "30", "40", "50"], dtype=object),
    )
    save_embeddings(tmp_path, saved)
    loaded = load_embeddings(tmp_path)
    np.testing.assert_array_equal(loaded.user, saved.user)
    np.testing.assert_array_equal(loaded.item, saved.item)
    assert loaded.item_ids.tolist() == ["10", "20", "30", "40", "50"]
    assert np.load(tmp_path / "item_embeddings.npy", allow_pickle=False).dtype == np.float32
    bare = tmp_path / "bare"
    save_embeddings(bare, Embeddings(saved.user, saved.item))
    assert load_embeddings(bare).user_ids is None


def test_sampled_softmax_matches_a_by_hand_reference():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(4, 4)), dtype=torch.float32)
    items = torch.tensor([7, 2, 7, 5])  # item 7 twice: not a negative of its own rows
    log_q = torch.tensor([-1.0, -2.0, -1.0, -3.0])
    got = sampled_softmax_loss(logits, items, log_q)
    losses = []
    z, q = logits.numpy(), log_q.numpy()
    for b in range(4):
        cols = [c for c in range(4) if c == b or items[c] != items[b]]
        row = np.array([z[b, c] - q[c] for c in cols])
        losses.append(np.log(np.exp(row).sum()) - row[cols.index(b)])
    assert float(got) == pytest.approx(np.mean(losses), rel=1e-5)


def test_bpr_loss_matches_a_by_hand_reference():
    got = bpr_loss(torch.tensor([2.0, -2.0]), torch.tensor([0.0, 2.0]))
    expected = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(4.0))])
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_item_bias_is_exported_as_one_more_dimension_that_ranks_like_the_logits():
    torch.manual_seed(0)
    config = TwoTowerConfig(n_users=3, n_items=5, dim=4, id_dim=4, hidden=(), item_bias=True)
    model = TwoTower(config).eval()
    assert torch.equal(model.item_bias.weight, torch.zeros(5, 1))  # no popularity to start
    with torch.no_grad():
        model.item_bias.weight.copy_(torch.arange(5.0)[:, None])
    history = UserHistory.from_interactions(interactions([0, 1, 1], [2, 0, 4]), 3)
    user_vecs, item_vecs = export_embeddings(model, history)
    assert user_vecs.shape == (3, 5) and item_vecs.shape == (5, 5)
    items, offsets = history.bags(np.arange(3))
    with torch.no_grad():
        u = model.user_vectors(
            torch.arange(3), None, torch.as_tensor(items), torch.as_tensor(offsets)
        )
        logits = model.logits(u, model.item_vectors(torch.arange(5)), torch.arange(5))
    scale = float(model.scale())
    np.testing.assert_allclose(
        user_vecs @ item_vecs.T * scale, logits.numpy(), rtol=1e-5, atol=1e-5
    )


def test_history_power_scales_the_pooled_sum():
    torch.manual_seed(0)
    config = TwoTowerConfig(n_users=2, n_items=6, dim=4, id_dim=4, history_power=0.5)
    model = TwoTower(config).eval()
    history = UserHistory.from_interactions(interactions([1, 1, 1, 1], [0, 2, 3, 5]), 2)
    user_vecs, _ = export_embeddings(model, history)
    with torch.no_grad():
        pooled = model.user_tower.history.weight[[0, 2, 3, 5]].sum(0, keepdim=True) / 2.0
        expected = model.user_vectors_pooled(torch.tensor([1]), None, pooled)
    np.testing.assert_allclose(user_vecs[1], expected[0].numpy(), rtol=1e-5, atol=1e-6)


def test_a_tower_without_projection_outputs_the_sum_of_its_embeddings():
    users, items = tables(3, 5)
    config = featured_config(3, 5, hidden=(), projection=False, normalize=False, init_std=0.1)
    model = TwoTower(config).eval()
    assert model.user_tower.mlp is None and model.item_tower.mlp is None
    ufeat = feature_tensors(users, config.user_features)
    ifeat = feature_tensors(items, config.item_features)
    pooled = torch.randn(3, 8)
    with torch.no_grad():
        got_u = model.user_vectors_pooled(torch.arange(3), ufeat, pooled)
        got_i = model.item_vectors(torch.arange(5), ifeat)
        want_u = model.user_tower.features(ufeat) + pooled
        want_i = model.item_tower.id_embedding.weight + model.item_tower.features(ifeat)
    torch.testing.assert_close(got_u, want_u)
    torch.testing.assert_close(got_i, want_i)
    # Every embedding table starts at the configured scale, not torch's N(0, 1).
    table = model.item_tower.id_embedding.weight
    assert 0.05 < float(table.detach().std()) < 0.2
