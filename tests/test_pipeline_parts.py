"""The pipeline's pieces: TOML configs, pickle-free artifacts, new-log merging, latency."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from slimrank.compression.latency import interleaved_latency
from slimrank.data.dataset import Dataset, FeatureTable, IdMap, Interactions, Split
from slimrank.pipeline import artifacts
from slimrank.pipeline.artifacts import DataArtifact, EmbeddingsArtifact, TwoTowerArtifact
from slimrank.pipeline.config import PipelineConfig, load_config
from slimrank.pipeline.retrain import append_logs

CONFIGS = Path(__file__).resolve().parent.parent / "slimrank" / "configs"


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
    with pytest.raises(ValueError, match=r"bad\.toml: k: 50: must be <= candidates\.n"):
        load_config(path)
    path.write_text("k = 20\n[candidates]\nn = 20\n")  # ranking every candidate is allowed
    assert load_config(path).k == 20
    path.write_text("[prune]\nepochs = 3\nramp_epochs = 4\n")
    with pytest.raises(ValueError, match=r"prune\.ramp_epochs: 4: .*epochs=3"):
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


def test_append_logs_keeps_known_new_pairs_only() -> None:
    def inter(users: list[int], items: list[int]) -> Interactions:
        n = len(users)
        return Interactions(users, items, np.ones(n), np.arange(n))

    split = Split(inter([0, 1], [0, 1]), inter([0], [2]), inter([1], [2]), 2, 3)
    base = DataArtifact(
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
        Interactions([0, 1, 2, 1, 1], [0, 1, 0, 2, 3], np.arange(5) + 1.0, np.arange(5) + 100),
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
    # The appended rows keep their own rating and timestamp (rows 0 and 4 of the logs).
    assert train.rating.tolist() == [1.0, 1.0, 1.0, 5.0]
    assert train.timestamp.tolist() == [0, 1, 100, 104]
    assert merged.split.valid is split.valid and merged.split.test is split.test


def test_interleaved_latency_orders_slow_and_fast() -> None:
    result = interleaved_latency(
        {"slow": lambda: time.sleep(0.003), "fast": lambda: None}, repeats=15, warmup=1
    )
    assert result["slow"]["p50"] >= 0.003
    assert result["fast"]["p50"] < result["slow"]["p50"]
    assert result["slow"]["p90"] >= result["slow"]["p50"]


def test_interleaved_latency_reports_the_median_and_p90_of_each_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scripted clock: each call of ``a`` takes its next duration, ``b`` always 2 s. The p50
    is the median (1 s for 1, 1, 1, 5, 9; the mean would be 3.4) and the p90 numpy's linear
    percentile; warmup calls are not timed."""
    from slimrank.compression import latency

    now = [0.0]
    durations = iter([1.0, 9.0, 1.0, 5.0, 1.0])

    def advance(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    calls = {"a": 0, "b": 0}

    def a() -> None:
        calls["a"] += 1
        if calls["a"] > 2:  # two warmup calls first
            advance(next(durations))

    def b() -> None:
        calls["b"] += 1
        advance(2.0)

    result = latency.interleaved_latency({"a": a, "b": b}, repeats=5, warmup=2)
    assert calls == {"a": 7, "b": 7}
    assert result["a"]["p50"] == 1.0
    assert result["a"]["p90"] == pytest.approx(7.4)  # 5 + 0.6 * (9 - 5), not the max
    assert result["b"] == {"p50": 2.0, "p90": 2.0}


def test_refit_folds_retrieve_with_models_that_never_saw_their_targets(tmp_path: Path) -> None:
    import dataclasses

    from slimrank.pipeline import steps
    from slimrank.retrieval.embeddings import export_embeddings
    from slimrank.retrieval.train import train_two_tower
    from slimrank.retrieval.two_tower import UserHistory

    config = load_config(CONFIGS / "tiny.toml")
    data = steps.data_step(config.data)
    two_tower = steps.two_tower_step(config.two_tower, data, config.k)
    candidates = dataclasses.replace(config.candidates, refit=True)
    train = config.two_tower.train
    # Through the artifacts' files, as the runner hands them on.
    two_tower.save(tmp_path)
    made = steps.embeddings_step(candidates, data, TwoTowerArtifact.load(tmp_path), train)
    made.save(tmp_path)
    emb = EmbeddingsArtifact.load(tmp_path)
    split = data.split
    assert len(emb.fold_item) == candidates.folds
    model = two_tower.model
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
