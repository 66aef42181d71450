"""Candidate mining against brute force, labels by hand, and the history / target folds."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from slimrank.evaluation.protocol import evaluate_full_ranking
from slimrank.ranking.candidates import (
    Candidates,
    exact_search,
    fold_item_history,
    label_candidates,
    mine_candidates,
    pair_lookup,
    split_history,
)
from slimrank.ranking.features import build_feature_tables
from slimrank.ranking.pipeline_eval import pipeline_metrics, pipeline_view


def random_data(seed: int = 0, n_users: int = 30, n_items: int = 50, d: int = 8):
    rng = np.random.default_rng(seed)
    user_vecs = rng.normal(size=(n_users, d)).astype(np.float32)
    item_vecs = rng.normal(size=(n_items, d)).astype(np.float32)
    seen = sp.random(n_users, n_items, density=0.2, random_state=seed, format="csr")
    seen.data[:] = 1.0
    return user_vecs, item_vecs, seen


def test_mining_equals_brute_force_without_excluded_items() -> None:
    user_vecs, item_vecs, seen = random_data()
    users = np.arange(0, 30, 2)
    cands = mine_candidates(user_vecs, exact_search(item_vecs), users, n=10, exclude=seen)
    dense_seen = seen.toarray().astype(bool)
    for row, u in enumerate(users):
        scores = item_vecs @ user_vecs[u]
        scores[dense_seen[u]] = -np.inf
        expected = np.argsort(-scores, kind="stable")[:10]
        np.testing.assert_array_equal(cands.items[row], expected)
        np.testing.assert_allclose(cands.retrieval_score[row], scores[expected], rtol=1e-5)
        assert not dense_seen[u, cands.items[row]].any()
    np.testing.assert_array_equal(cands.user, users)


def test_mining_in_small_batches_equals_one_batch() -> None:
    """Batches of 4 users give every user's list, the same as one batch of all 30."""
    user_vecs, item_vecs, seen = random_data(seed=6)
    users = np.arange(30)[::-1]
    search = exact_search(item_vecs)
    whole = mine_candidates(user_vecs, search, users, n=7, exclude=seen)
    small = mine_candidates(user_vecs, search, users, n=7, exclude=seen, batch_size=4)
    np.testing.assert_array_equal(small.user, users)
    np.testing.assert_array_equal(small.items, whole.items)
    np.testing.assert_array_equal(small.retrieval_score, whole.retrieval_score)


def test_mining_pads_when_too_few_items_remain() -> None:
    user_vecs, item_vecs, _ = random_data(n_items=6)
    exclude = sp.csr_matrix(np.array([[1, 1, 0, 1, 0, 0]] + [[0] * 6] * 29, dtype=np.float32))
    cands = mine_candidates(
        user_vecs, exact_search(item_vecs), np.array([0, 1]), n=5, exclude=exclude
    )
    assert cands.items.shape == (2, 5)
    assert sorted(cands.items[0, :3].tolist()) == [2, 4, 5]
    np.testing.assert_array_equal(cands.items[0, 3:], [-1, -1])
    np.testing.assert_array_equal(cands.retrieval_score[0, 3:], [0.0, 0.0])
    np.testing.assert_array_equal(cands.mask.sum(axis=1), [3, 5])


def test_mining_drops_minus_one_results_of_the_index() -> None:
    def short_search(queries: np.ndarray, k: int):
        idx = np.tile(np.array([3, -1, 1, 0]), (len(queries), 1))
        return np.tile(np.array([4.0, 0.0, 2.0, 1.0], dtype=np.float32), (len(queries), 1)), idx

    cands = mine_candidates(np.zeros((2, 4)), short_search, np.array([0, 1]), n=4)
    np.testing.assert_array_equal(cands.items, [[3, 1, 0, -1], [3, 1, 0, -1]])
    np.testing.assert_array_equal(cands.retrieval_score[0], [4.0, 2.0, 1.0, 0.0])


def test_labels_by_hand() -> None:
    cands = Candidates(
        user=np.array([2, 0]),
        items=np.array([[4, 1, -1], [0, 3, 2]]),
        retrieval_score=np.zeros((2, 3)),
    )
    positives = sp.csr_matrix(
        np.array([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 1]], dtype=np.float32)
    )
    np.testing.assert_array_equal(
        label_candidates(cands, positives), [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    )


def test_pair_lookup_matches_dense_indexing() -> None:
    m = sp.random(7, 9, density=0.3, random_state=1, format="csr", dtype=np.float32)
    rng = np.random.default_rng(1)
    rows, cols = rng.integers(0, 7, size=(4, 5)), rng.integers(0, 9, size=(4, 5))
    np.testing.assert_array_equal(pair_lookup(m, rows, cols), m.toarray()[rows, cols])
    assert pair_lookup(m, np.array([-1]), np.array([0]))[0] == 0.0
    # Outside the matrix reads 0: column 9 of row r is not column 0 of row r + 1.
    dense = np.zeros((2, 3), np.float32)
    dense[1, 0], dense[0, 2] = 5.0, 7.0
    outside = pair_lookup(
        sp.csr_matrix(dense), np.array([0, 0, 1, 2, 1]), np.array([3, 4, 3, 0, -3])
    )
    np.testing.assert_array_equal(outside, [0, 0, 0, 0, 0])


def test_exact_search_breaks_ties_by_lower_item_index() -> None:
    """Equal scores come back in item order (20 items score 1, then 20 score 2), past
    numpy's 16-element insertion sort where an unstable sort reorders them."""
    item_vecs = np.repeat(np.array([1.0, 2.0], dtype=np.float32), 20)[:, None]  # (40, 1)
    scores, idx = exact_search(item_vecs)(np.ones((2, 1), dtype=np.float32), 30)
    want = [*range(20, 40), *range(10)]
    np.testing.assert_array_equal(idx, [want, want])
    np.testing.assert_array_equal(scores[0], [2.0] * 20 + [1.0] * 10)


def test_split_history_keeps_one_history_item_at_a_large_target_frac() -> None:
    """``target_frac=0.9`` still leaves every user with two or more items one history item."""
    counts = [2, 3, 10]
    dense = np.zeros((3, 12), dtype=np.float32)
    for u, c in enumerate(counts):
        dense[u, :c] = 1.0
    history, target = split_history(sp.csr_matrix(dense), target_frac=0.9, seed=0)
    np.testing.assert_array_equal(np.diff(target.indptr), [1, 2, 9])
    np.testing.assert_array_equal(np.diff(history.indptr), [1, 1, 1])


def test_split_history_partitions_each_user() -> None:
    _, _, train = random_data(seed=3, n_users=40, n_items=60)
    history, target = split_history(train, target_frac=0.2, seed=5)
    assert (history + target - train).nnz == 0  # a partition of train
    assert history.multiply(target).nnz == 0
    counts = np.diff(train.indptr)
    n_target = np.diff(target.indptr)
    expected = np.where(counts >= 2, np.clip(np.rint(0.2 * counts), 1, counts - 1), 0)
    np.testing.assert_array_equal(n_target, expected)
    again = split_history(train, target_frac=0.2, seed=5)[1]
    assert (again != target).nnz == 0  # seeded
    other = split_history(train, target_frac=0.2, seed=6)[1]
    assert (other != target).nnz > 0


def test_a_folds_item_history_is_train_but_the_sampled_users_targets() -> None:
    _, _, train = random_data(seed=3, n_users=40, n_items=60)
    history, target = split_history(train, target_frac=0.25, seed=1)
    sampled = np.array([0, 3, 4, 17, 39])
    items = fold_item_history(history, target, sampled)
    dense = items.toarray()
    for u in range(40):  # row by row, from the definition
        expected = history[u] if u in sampled else train[u]
        np.testing.assert_array_equal(dense[u], expected.toarray().ravel())
    assert sp.csr_matrix(items.multiply(target)[sampled]).nnz == 0  # no label is read
    every = np.flatnonzero(np.diff(target.indptr) > 0)
    assert (fold_item_history(history, target, every) != history).nnz == 0


def test_item_history_gives_the_item_statistics_and_history_the_users() -> None:
    """build_feature_tables(history, item_history=M): popularity, co-occurrence and EASE are
    M's, each user's history is ``history``'s."""
    user_vecs, item_vecs, train = random_data(seed=5, n_users=40, n_items=30)
    history, target = split_history(train, target_frac=0.25, seed=2)
    items = fold_item_history(history, target, np.arange(0, 40, 4))
    tables = build_feature_tables(history, user_vecs, item_vecs, item_history=items)
    of_items = build_feature_tables(items, user_vecs, item_vecs)
    of_history = build_feature_tables(history, user_vecs, item_vecs)
    np.testing.assert_array_equal(tables.item_log_popularity, of_items.item_log_popularity)
    assert not np.array_equal(tables.item_log_popularity, of_history.item_log_popularity)
    for name in ("cooc", "ease"):
        got, want = getattr(tables, name).to_csr(), getattr(of_items, name).to_csr()
        assert abs(got - want).max() == 0
        assert abs(got - getattr(of_history, name).to_csr()).max() > 0
    np.testing.assert_array_equal(tables.history.items, of_history.history.items)
    np.testing.assert_array_equal(tables.history.indptr, of_history.history.indptr)
    with pytest.raises(ValueError, match="item_history"):
        build_feature_tables(history, user_vecs, item_vecs, item_history=items[:10])


def test_training_view_has_positives_among_candidates() -> None:
    """Mining on the history fold with target labels yields positives; on all of train, none."""
    user_vecs, item_vecs, train = random_data(seed=4, n_users=20, n_items=40)
    history, target = split_history(train, 0.25, seed=0)
    users = np.arange(20)
    search = exact_search(item_vecs)
    cands = mine_candidates(user_vecs, search, users, n=40, exclude=history)
    assert label_candidates(cands, target).sum() == target.nnz  # n covers the whole catalog
    leaky = mine_candidates(user_vecs, search, users, n=40, exclude=train)
    assert label_candidates(leaky, train).sum() == 0


def test_pipeline_with_every_item_retrieved_equals_the_full_ranking_protocol() -> None:
    """Retrieve all items and keep retrieval order: the protocol's full ranking, same metrics."""
    user_vecs, item_vecs, seen = random_data(seed=7, n_users=30, n_items=50)
    truth = sp.random(30, 50, density=0.1, random_state=8, format="csr")
    truth.data[:] = 1.0
    truth = sp.csr_matrix(truth - truth.multiply(seen))  # relevant items are unseen ones
    truth.eliminate_zeros()
    tables = build_feature_tables(seen, user_vecs, item_vecs)
    view = pipeline_view(exact_search(item_vecs), user_vecs, tables, truth, seen, n=50)
    got = view.retrieval_only(ks=(5, 10))
    expected = evaluate_full_ranking(
        lambda users: user_vecs[users] @ item_vecs.T, truth, seen, ks=(5, 10)
    )
    for key in ("ndcg@10", "recall@10", "mrr@10", "ndcg@5", "hit@5"):
        assert got[key] == pytest.approx(expected[key], abs=1e-9)
    assert got["users"] == expected["users"]
    assert got["candidate_recall"] == pytest.approx(1.0)
    # With fewer candidates, relevant items beyond the retrieved ones can only be lost.
    small = pipeline_view(exact_search(item_vecs), user_vecs, tables, truth, seen, n=5)
    assert small.retrieval_only()["recall@10"] <= got["recall@10"]


def test_pipeline_view_and_metrics_count_only_users_with_truth() -> None:
    """The view mines lists only for users with a relevant item, and candidate recall is
    averaged over those users: a user without truth neither gets a list nor counts as 0."""
    user_vecs, item_vecs, seen = random_data(seed=2, n_users=6, n_items=10)
    truth = sp.csr_matrix((np.ones(3, dtype=np.float32), ([1, 1, 4], [0, 5, 7])), shape=(6, 10))
    empty = sp.csr_matrix((6, 10), dtype=np.float32)
    tables = build_feature_tables(seen, user_vecs, item_vecs)
    view = pipeline_view(exact_search(item_vecs), user_vecs, tables, truth, empty, n=10)
    np.testing.assert_array_equal(view.cands.user, [1, 4])
    # Lists for users 0..5 (the catalog is retrieved whole): recall 1 for users 1 and 4.
    cands = mine_candidates(user_vecs, exact_search(item_vecs), np.arange(6), 10)
    metrics = pipeline_metrics(cands, cands.retrieval_score, truth)
    assert metrics["candidate_recall"] == 1.0 and metrics["users"] == 2.0
