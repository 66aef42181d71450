"""The catalog-scale peers: ALS from ``implicit``, ranked under the protocol exactly as
implicit's own ``recommend()`` ranks, and item-KNN from a sparse top-k table against a dense
brute force; both selected on validation and kept at catalog sizes the dense peers skip."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from slimrank.data.dataset import Interactions, split_random
from slimrank.data.world import WorldConfig, iter_interactions
from slimrank.evaluation import peers
from slimrank.evaluation.peers import (
    ALS,
    ALS_SMALL,
    MOST_POPULAR,
    PEERS,
    SCALE_PEERS,
    evaluate_peer,
    fit_als,
    fit_item_knn_sparse,
    observed_interactions,
    peers_for,
    score_part,
)
from slimrank.evaluation.protocol import rank_users

WORLD = WorldConfig(n_users=800, n_items=400, per_user=12, pool_per_genre=40, seed=2)
PARAMS = {"factors": 16, "regularization": 0.05, "alpha": 5.0, "iterations": 8}


@pytest.fixture(scope="module")
def split():
    cols = next(iter_interactions(WORLD, chunk_users=WORLD.n_users))
    users = np.unique(cols["user_id"], return_inverse=True)[1]
    item_ids, items = np.unique(cols["item_id"], return_inverse=True)
    logs = Interactions(users, items, np.ones(len(users), np.float32), cols["timestamp"])
    return split_random(logs, int(users.max()) + 1, len(item_ids), seed=0)


def test_als_ranks_as_implicits_own_recommend(split) -> None:
    observed = observed_interactions(split, "test")
    users = np.arange(0, split.n_users, 7)
    k = 10
    ours = rank_users(fit_als(observed, PARAMS), users, observed, k)  # (U, k)

    binary = sp.csr_matrix(observed, dtype=np.float32)
    binary.data[:] = 1.0
    # The reference fits on one thread; fit_als on ALS_THREADS (every core): the same factors.
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=PARAMS["factors"],
            regularization=PARAMS["regularization"],
            alpha=PARAMS["alpha"],
            iterations=PARAMS["iterations"],
            random_state=0,
            num_threads=1,
        )
        model.fit(binary, show_progress=False)
    ids, _ = model.recommend(users, binary[users], N=k, filter_already_liked_items=True)
    np.testing.assert_array_equal(ours, ids)


def test_als_scores_do_not_depend_on_its_thread_count(split, monkeypatch) -> None:
    """fit_als runs on ALS_THREADS; one thread and two give the same scores bit for bit."""
    observed = observed_interactions(split, "test")
    users = np.arange(0, split.n_users, 3)
    scores = {}
    for threads in (1, 2):
        monkeypatch.setattr(peers, "ALS_THREADS", threads)
        scores[threads] = fit_als(observed, PARAMS)(users)
    np.testing.assert_array_equal(scores[1], scores[2])


def test_als_seed_is_a_parameter_and_only_it_changes_the_fit(split) -> None:
    """``random_state`` (default 0) reaches implicit: the same seed gives the same scores,
    another seed other ones (bench/more_peers.py's seed spread relies on it)."""
    observed = observed_interactions(split, "valid")
    users = np.arange(0, split.n_users, 5)
    default = fit_als(observed, PARAMS)(users)
    np.testing.assert_array_equal(default, fit_als(observed, {**PARAMS, "random_state": 0})(users))
    seeded = fit_als(observed, {**PARAMS, "random_state": 1})(users)
    np.testing.assert_array_equal(seeded, fit_als(observed, {**PARAMS, "random_state": 1})(users))
    assert not np.allclose(default, seeded)


def test_als_is_selected_on_validation_and_refitted_on_train_and_valid(split) -> None:
    als = evaluate_peer(ALS, split, k=10)
    assert len(als.trials) == len(ALS.settings())
    assert als.valid["ndcg@10"] == max(v for _, v in als.trials)
    assert als.params in ALS.settings()
    # The test score is the selected setting refitted on what the test part may read.
    test, per_user = score_part(fit_als, als.params, split, "test", k=10)
    assert als.test == test
    np.testing.assert_array_equal(als.test_per_user.values, per_user.values)


def test_a_user_sample_scores_only_those_users(split) -> None:
    sample = np.arange(0, split.n_users, 5)
    result = evaluate_peer(MOST_POPULAR, split, k=10, users=sample)
    assert set(result.test_per_user.users) <= set(sample)
    assert result.test["users"] == len(result.test_per_user.users) > 0


def test_als_is_kept_past_the_dense_limit_with_its_own_grid_in_each_comparison() -> None:
    kept, skipped = peers_for(1_000_000, SCALE_PEERS + PEERS[1:])
    assert kept == SCALE_PEERS
    assert [s.split(" (")[0] for s in skipped] == ["EASE", "item-KNN", "RP3beta", "ALS"]
    # The small comparison's ALS is another grid (ml-100k wants far more regularization
    # per unit of confidence alpha), under the same name.
    assert ALS not in PEERS and ALS_SMALL in PEERS and ALS_SMALL.name == ALS.name
    assert max(ALS_SMALL.grid["alpha"]) < min(ALS.grid["alpha"])


def test_sparse_item_knn_scores_with_each_items_k_nearest_by_brute_force(split) -> None:
    observed = observed_interactions(split, "valid")
    x = observed.toarray() > 0
    counts = x.sum(axis=0).astype(np.float32)
    inv = (1.0 / np.sqrt(np.maximum(counts, 1.0))).astype(np.float32)
    # float32 in the table's order of operations, so that equal similarities tie exactly
    cosine = ((x.T.astype(np.float32) @ x) * inv[:, None]) * inv[None, :]
    np.fill_diagonal(cosine, 0.0)
    users = np.arange(0, split.n_users, 7)
    for k in (5, 40):
        weights = np.zeros_like(cosine)
        for j in range(cosine.shape[1]):  # item j's k strongest (ties: the lower item row)
            column = cosine[j, :]  # row j is item j's, as the table computes it
            keep = [h for h in np.lexsort((np.arange(len(column)), -column)) if column[h] > 0]
            weights[keep[:k], j] = column[keep[:k]]
        expected = x[users].astype(np.float64) @ weights
        got = fit_item_knn_sparse(observed, {"k": k})(users)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    result = evaluate_peer(SCALE_PEERS[1], split, k=10, users=users)
    assert result.params["k"] in (50, 100, 200) and result.test_top is not None
    assert result.test_top.shape == (len(result.test_per_user.users), 10)
