"""Candidate features: shapes, determinism, U=1 equals the batch, hand-computed signals."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from slimrank.data.dataset import FeatureTable
from slimrank.evaluation.baselines import EaseConfig, ease_weights
from slimrank.ranking.candidates import Candidates, exact_search, mine_candidates
from slimrank.ranking.features import (
    FeatureConfig,
    ItemItem,
    build_feature_tables,
    candidate_features,
    cooccurrence,
    history_signals,
    user_knn_scores,
)


def small_world(seed: int = 0, n_users: int = 25, n_items: int = 40, d: int = 4):
    rng = np.random.default_rng(seed)
    history = sp.random(n_users, n_items, density=0.15, random_state=seed, format="csr")
    history.data[:] = 1.0
    user_vecs = rng.normal(size=(n_users, d)).astype(np.float32)
    item_vecs = rng.normal(size=(n_items, d)).astype(np.float32)
    users_ft = FeatureTable(
        n_users,
        categorical={"gender": rng.integers(0, 3, n_users), "zip": rng.integers(0, 500, n_users)},
        cardinality={"gender": 3, "zip": 500},
    )
    items_ft = FeatureTable(
        n_items,
        numeric={"year": rng.normal(1990, 5, n_items).astype(np.float32)},
        multi_hot={"genre": (rng.random((n_items, 3)) < 0.3).astype(np.float32)},
    )
    tables = build_feature_tables(history, user_vecs, item_vecs, users_ft, items_ft)
    cands = mine_candidates(user_vecs, exact_search(item_vecs), np.arange(n_users), 12, history)
    return tables, cands


def test_shape_names_and_determinism() -> None:
    tables, cands = small_world()
    a = candidate_features(tables, cands)
    b = candidate_features(tables, cands)
    d = 4
    # 10 signals, gender one-hot (zip has too many values), year, 3 genres, 3 * d embeddings
    assert a.values.shape == (25, 12, 10 + 3 + 1 + 3 + 3 * d + 3)
    assert a.values.dtype == np.float32
    assert len(a.names) == a.values.shape[2] == len(set(a.names))
    assert "user_gender=1" in a.names and not any("zip" in n for n in a.names)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.items, cands.items)


def test_one_user_equals_its_batch_row() -> None:
    tables, cands = small_world(seed=1)
    batch = candidate_features(tables, cands)
    for row in (0, 7, 24):
        one = candidate_features(tables, cands.take(np.array([row])))
        np.testing.assert_array_equal(one.values[0], batch.values[row])


def test_columns_match_their_definition() -> None:
    tables, cands = small_world(seed=2)
    feats = candidate_features(tables, cands)
    col = {n: i for i, n in enumerate(feats.names)}
    v = feats.values
    np.testing.assert_allclose(v[:, :, col["retrieval_score"]], cands.retrieval_score)
    pop = np.asarray(tables.history.sum(axis=0)).ravel()
    np.testing.assert_allclose(v[:, :, col["item_log_popularity"]], np.log1p(pop[cands.items]))
    u, i = tables.user_vecs[cands.user], tables.item_vecs[cands.items]
    np.testing.assert_allclose(v[:, :, col["dot_2"]], u[:, None, 2] * i[:, :, 2], rtol=1e-6)
    # EASE score feature equals the dense EASE scores X @ B.
    b = ease_weights(tables.history, EaseConfig(l2=FeatureConfig().ease_lambda))
    dense = np.asarray(tables.history.toarray() @ b)
    np.testing.assert_allclose(
        v[:, :, col["ease_score"]], dense[cands.user[:, None], cands.items], atol=1e-5
    )
    # Retrieval ordering puts the dot product first.
    np.testing.assert_allclose(
        v[:, :, col["retrieval_score"]], (u[:, None, :] * i).sum(-1), rtol=1e-5, atol=1e-5
    )


def test_cooccurrence_by_hand_on_four_items() -> None:
    # u0: {0, 1}; u1: {0, 1, 2}; u2: {1, 3}. Item counts 2, 3, 1, 1.
    history = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]], dtype=np.float32))
    c = cooccurrence(history).toarray()
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = 2 / np.sqrt(6)
    expected[0, 2] = expected[2, 0] = 1 / np.sqrt(2)
    expected[1, 2] = expected[2, 1] = 1 / np.sqrt(3)
    expected[1, 3] = expected[3, 1] = 1 / np.sqrt(3)
    np.testing.assert_allclose(c, expected, rtol=1e-6)
    vecs = np.eye(4, 2, dtype=np.float32)
    tables = build_feature_tables(history, vecs[:3], vecs, config=FeatureConfig(ease_lambda=0))
    cands = Candidates(np.array([0]), np.array([[2, 3, -1]]), np.array([[0.5, 0.2, 0.0]]))
    feats = candidate_features(tables, cands)
    col = {n: i for i, n in enumerate(feats.names)}
    assert "ease_score" not in col
    got = feats.values[0]
    np.testing.assert_allclose(got[:2, col["cooc_sum"]], [2**-0.5 + 3**-0.5, 3**-0.5], rtol=1e-6)
    np.testing.assert_allclose(got[:2, col["cooc_max"]], [2**-0.5, 3**-0.5], rtol=1e-6)
    np.testing.assert_allclose(
        got[:2, col["cooc_mean"]], [(2**-0.5 + 3**-0.5) / 2, 3**-0.5 / 2], rtol=1e-6
    )
    np.testing.assert_array_equal(got[2], 0.0)  # the pad


def test_neighbour_truncation_keeps_the_strongest() -> None:
    history = sp.random(30, 20, density=0.3, random_state=3, format="csr")
    history.data[:] = 1.0
    full = cooccurrence(history).toarray()
    top = cooccurrence(history, neighbors=3).toarray()
    assert ((top > 0).sum(axis=1) <= 3).all()
    for r in range(20):
        kept = np.flatnonzero(top[r])
        np.testing.assert_allclose(top[r, kept], full[r, kept])
        if len(kept):
            assert full[r].max() == pytest.approx(top[r].max())


def test_history_signals_do_not_depend_on_chunking() -> None:
    tables, cands = small_world(seed=4)
    weights = ItemItem.from_csr(sp.random(40, 40, density=0.3, random_state=4, format="csr"))
    big = history_signals(tables.history, weights, cands.user, cands.items, 10**9)
    small = history_signals(tables.history, weights, cands.user, cands.items, 7)
    np.testing.assert_array_equal(big[0], small[0])
    np.testing.assert_array_equal(big[1], small[1])
    dense = weights.to_csr().toarray()
    hist = tables.history.toarray().astype(bool)
    u, row = cands.user[3], 3
    col = cands.items[row, 0]
    vals = dense[hist[u], col]
    assert big[0][row, 0] == pytest.approx(vals.sum(), rel=1e-5)
    assert big[1][row, 0] == pytest.approx(vals.max() if len(vals) else 0.0)


def test_user_knn_by_hand() -> None:
    # u0: {0, 1}; u1: {0, 1, 2}; u2: {1, 3}; u3: {3}. Cosine to u0: u1 2/sqrt(6), u2 1/2, u3 0.
    history = sp.csr_matrix(
        np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 1]], dtype=np.float32)
    )
    items = np.array([[2, 3, -1]])
    one = user_knn_scores(history, np.array([0]), items, k=1)  # only u1
    np.testing.assert_allclose(one, [[2 / np.sqrt(6), 0.0, 0.0]], rtol=1e-6)
    two = user_knn_scores(history, np.array([0]), items, k=2)  # u1 and u2
    np.testing.assert_allclose(two, [[2 / np.sqrt(6), 0.5, 0.0]], rtol=1e-6)
    # Chunking over users does not change anything.
    users = np.array([0, 1, 2, 3])
    batch = np.tile(np.array([[0, 1, 2, 3]]), (4, 1))
    np.testing.assert_allclose(
        user_knn_scores(history, users, batch, 2, chunk_cells=4),
        user_knn_scores(history, users, batch, 2),
    )


def test_rank_columns_rank_within_the_list() -> None:
    tables, cands = small_world(seed=5)
    feats = candidate_features(tables, cands)
    col = {n: i for i, n in enumerate(feats.names)}
    for row in (0, 9):
        ease = feats.values[row, :, col["ease_score"]]
        rank = np.expm1(feats.values[row, :, col["ease_score_rank"]]).round().astype(int)
        real = cands.mask[row]
        expected = np.argsort(np.argsort(-ease[real], kind="stable"), kind="stable")
        np.testing.assert_array_equal(rank[real], expected)


def test_item_item_dense_and_sparse_storage_agree() -> None:
    full = sp.random(40, 40, density=0.3, random_state=6, format="csr", dtype=np.float32)
    thin = sp.random(40, 40, density=0.05, random_state=6, format="csr", dtype=np.float32)
    rng = np.random.default_rng(6)
    rows, cols = rng.integers(-1, 40, size=(7, 9)), rng.integers(-1, 40, size=(7, 9))
    for m in (full, thin):
        table = ItemItem.from_csr(m)
        expected = np.where((rows >= 0) & (cols >= 0), m.toarray()[rows, cols], 0.0)
        np.testing.assert_array_equal(table.lookup(rows, cols), expected)
        assert (table.to_csr() != m).nnz == 0
    assert ItemItem.from_csr(full).dense is not None and ItemItem.from_csr(thin).dense is None
