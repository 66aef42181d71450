"""The pipeline's pieces: TOML configs, pickle-free artifacts, new-log merging, latency."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from slimrank.data.dataset import Dataset, FeatureTable, IdMap, Interactions, Split
from slimrank.pipeline import artifacts
from slimrank.pipeline.config import PipelineConfig, load_config
from slimrank.pipeline.latency import interleaved_latency
from slimrank.pipeline.retrain import append_logs
from slimrank.pipeline.steps import DataArtifacts
from slimrank.ranking.candidates import Candidates
from slimrank.ranking.features import FeatureConfig, build_feature_tables, candidate_features

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_shipped_configs_load() -> None:
    full = load_config(CONFIGS / "pipeline.toml")
    tiny = load_config(CONFIGS / "tiny.toml")
    assert full.data.source == "movielens-100k" and full.candidates.n == 200
    assert full.data.split.ratios == (0.8, 0.1, 0.1)
    assert tiny.data.source == "synthetic"
    assert PipelineConfig.from_dict(full.to_dict()) == full


def test_config_rejects_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[student]\nhiden = [8]\n")
    with pytest.raises(ValueError, match="hiden"):
        load_config(path)
    path.write_text("k = 50\n[candidates]\nn = 20\n")
    with pytest.raises(ValueError, match=r"PipelineConfig\.k=50"):
        load_config(path)
    path.write_text("[prune]\nepochs = 3\nramp_epochs = 4\n")
    with pytest.raises(ValueError, match=r"ramp_epochs=4.*epochs=3"):
        load_config(path)


def _table(n: int) -> FeatureTable:
    rng = np.random.default_rng(0)
    return FeatureTable(
        n,
        categorical={"genre": rng.integers(0, 3, n)},
        cardinality={"genre": 3},
        numeric={"age": rng.normal(size=n).astype(np.float32)},
        multi_hot={"tags": (rng.random((n, 4)) < 0.5).astype(np.float32)},
        vocab={"genre": ["a", "b", "c"], "tags": ["w", "x", "y", "z"]},
    )


def test_feature_table_and_split_round_trip(tmp_path: Path) -> None:
    table = _table(7)
    artifacts.save_feature_table(tmp_path / "t.safetensors", table)
    back = artifacts.load_feature_table(tmp_path / "t.safetensors")
    assert back.names == table.names and back.vocab == table.vocab
    assert back.cardinality == table.cardinality
    for kind in ("categorical", "numeric", "multi_hot"):
        for name, values in getattr(table, kind).items():
            np.testing.assert_array_equal(getattr(back, kind)[name], values)
    artifacts.save_feature_table(tmp_path / "e.safetensors", FeatureTable.empty(3))
    assert artifacts.load_feature_table(tmp_path / "e.safetensors").names == []

    def inter(users: list[int], items: list[int]) -> Interactions:
        n = len(users)
        return Interactions(users, items, np.ones(n), np.arange(n))

    split = Split(inter([0, 1, 1], [2, 0, 1]), inter([0], [1]), inter([1], [2]), 2, 3)
    artifacts.save_split(tmp_path / "s.safetensors", split)
    again = artifacts.load_split(tmp_path / "s.safetensors")
    assert (again.n_users, again.n_items) == (2, 3)
    for part in ("train", "valid", "test"):
        for f in ("user", "item", "rating", "timestamp"):
            np.testing.assert_array_equal(
                getattr(getattr(again, part), f), getattr(getattr(split, part), f)
            )


def test_serving_tables_reproduce_candidate_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n_users, n_items, d = 12, 20, 4
    history = sp.csr_matrix((rng.random((n_users, n_items)) < 0.3).astype(np.float32))
    user_vecs = rng.normal(size=(n_users, d)).astype(np.float32)
    item_vecs = rng.normal(size=(n_items, d)).astype(np.float32)
    config = FeatureConfig(cooc_neighbors=5, ease_lambda=5.0)
    tables = build_feature_tables(
        history, user_vecs, item_vecs, _table(n_users), _table(n_items), config
    )
    layout = artifacts.save_serving_tables(tmp_path / "f.safetensors", tables)
    loaded = artifacts.load_serving_tables(tmp_path / "f.safetensors", layout, user_vecs, item_vecs)
    items = rng.integers(0, n_items, (n_users, 6))
    items[0, -2:] = -1  # padded candidates
    cands = Candidates(np.arange(n_users), items, rng.random((n_users, 6)).astype(np.float32))
    want = candidate_features(tables, cands)
    got = candidate_features(loaded, cands)
    assert got.names == want.names
    np.testing.assert_array_equal(got.values, want.values)


def test_append_logs_keeps_known_new_pairs_only() -> None:
    def inter(users: list[int], items: list[int]) -> Interactions:
        n = len(users)
        return Interactions(users, items, np.ones(n), np.arange(n))

    split = Split(inter([0, 1], [0, 1]), inter([0], [2]), inter([1], [2]), 2, 3)
    base = DataArtifacts(
        split, np.array(["u0", "u1"]), np.array(["i0", "i1", "i2"]),
        FeatureTable.empty(2), FeatureTable.empty(3),
    )  # fmt: skip
    # Logs with their own id order: (u1, i0) new, (u0, i2) held out in valid,
    # (u9, i0) unknown user, (u0, i7) unknown item, (u0, i1) new.
    users = IdMap(["u1", "u0", "u9"])
    items = IdMap(["i0", "i2", "i7", "i1"])
    logs = Dataset(
        "new",
        users,
        items,
        Interactions([0, 1, 2, 1, 1], [0, 1, 0, 2, 3], np.ones(5), np.arange(5) + 100),
        FeatureTable.empty(3),
        FeatureTable.empty(4),
    )
    merged, counts = append_logs(base, logs)
    assert counts == {"appended": 2, "dropped_unknown_id": 2, "dropped_in_valid_or_test": 1}
    train = merged.split.train
    assert list(zip(train.user.tolist(), train.item.tolist(), strict=True)) == [
        (0, 0),
        (1, 1),
        (1, 0),
        (0, 1),
    ]
    assert merged.split.valid is split.valid and merged.split.test is split.test


def test_interleaved_latency_orders_slow_and_fast() -> None:
    result = interleaved_latency(
        {"slow": lambda: time.sleep(0.003), "fast": lambda: None}, repeats=15, warmup=1
    )
    assert result["slow"]["p50"] >= 0.003
    assert result["fast"]["p50"] < result["slow"]["p50"]
    assert result["slow"]["p90"] >= result["slow"]["p50"]


def test_serving_featurizer_matches_batch_features() -> None:
    from slimrank.pipeline.serving_features import featurizer

    rng = np.random.default_rng(2)
    n_users, n_items, d = 9, 15, 3
    history = sp.csr_matrix((rng.random((n_users, n_items)) < 0.3).astype(np.float32))
    user_vecs = rng.normal(size=(n_users, d)).astype(np.float32)
    item_vecs = rng.normal(size=(n_items, d)).astype(np.float32)
    tables = build_feature_tables(
        history, user_vecs, item_vecs, _table(n_users), _table(n_items),
        FeatureConfig(cooc_neighbors=4, ease_lambda=5.0),
    )  # fmt: skip
    featurize = featurizer(tables)
    items = np.array([4, 0, 11, 7, -1])
    for user in (0, 5):
        scores = np.where(items >= 0, item_vecs[np.maximum(items, 0)] @ user_vecs[user], 0)
        cands = Candidates([user], items[None], scores[None].astype(np.float32))
        want = candidate_features(tables, cands).values[0]
        np.testing.assert_allclose(featurize(user, user_vecs[user], items), want, atol=1e-6)
    cold = featurize(-1, user_vecs[0], items)
    names = tables.feature_names
    for column in ("user_log_history", "cooc_sum", "ease_score"):
        assert np.all(cold[:, names.index(column)] == 0)
    assert np.all(cold[-1] == 0)  # the padded candidate


def test_refit_folds_retrieve_with_models_that_never_saw_their_targets(tmp_path: Path) -> None:
    import dataclasses

    from slimrank.pipeline import steps
    from slimrank.retrieval.embeddings import export_embeddings
    from slimrank.retrieval.train import train_two_tower
    from slimrank.retrieval.two_tower import UserHistory, load_model

    config = load_config(CONFIGS / "tiny.toml")
    dirs = {name: tmp_path / name for name in ("data", "tt", "emb")}
    for path in dirs.values():
        path.mkdir()
    steps.data_step(config.data, dirs["data"])
    steps.two_tower_step(config.two_tower, dirs["data"], dirs["tt"], config.k)
    candidates = dataclasses.replace(config.candidates, refit=True)
    train = config.two_tower.train
    steps.embeddings_step(candidates, dirs["data"], dirs["tt"], dirs["emb"], train)
    data = steps.load_data(dirs["data"])
    split = data.split
    emb = steps.load_embeddings(dirs["emb"], split.n_users, split.n_items)
    assert len(emb.fold_item) == candidates.folds
    model = load_model(dirs["tt"] / "model")
    for i in range(candidates.folds):
        # The reference: the same model trained on the fold's history alone.
        history = artifacts.interactions_from_matrix(emb.history[i])
        fold_split = dataclasses.replace(split, train=history)
        ref = train_two_tower(
            model.config, train, fold_split, data.user_features, data.item_features
        ).model
        hist = UserHistory.from_interactions(history, split.n_users, model.config.max_history)
        user, item = export_embeddings(ref, hist, data.user_features, data.item_features)
        np.testing.assert_allclose(
            emb.user[f"fold{i}"] @ emb.fold_item[i].T, user @ item.T, rtol=1e-4, atol=1e-4
        )
        # Rotated onto the full model's axes, yet not the full model's vectors.
        assert not np.allclose(emb.fold_item[i], emb.item, atol=1e-3)
