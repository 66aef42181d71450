"""Peers under equal information: hand examples and brute-force dense references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
from hand_data import interactions_of

from slimrank.data.dataset import Interactions, Split, split_random
from slimrank.evaluation.baselines import EaseConfig, ease_weights
from slimrank.evaluation.peers import (
    Peer,
    evaluate_peer,
    evaluate_peers,
    fit_item_knn,
    fit_item_knn_sparse,
    fit_most_popular,
    format_params,
    item_knn_weights,
    keep_top_k,
    observed_interactions,
    observed_times,
    protocol_check,
    rp3beta_weights,
    score_fitted,
    score_part,
)


def _hand_split() -> Split:
    """3 users, 4 items. Train counts i0: 3, i1: 1, i2: 1, i3: 0; valid adds i2 and i3."""
    return Split(
        train=interactions_of([(0, 0), (0, 1), (1, 0), (2, 0), (2, 2)]),
        valid=interactions_of([(0, 2), (1, 3)]),
        test=interactions_of([(0, 3), (1, 1), (2, 3)]),
        n_users=3,
        n_items=4,
    )


def _random_binary(seed: int, users: int = 30, items: int = 12, density: float = 0.3):
    rng = np.random.default_rng(seed)
    dense = (rng.random((users, items)) < density).astype(np.float64)
    dense[0, :] = 0.0  # a user with nothing
    dense[:, -1] = 0.0  # an item nobody has
    return dense


def test_observed_interactions_is_train_for_valid_and_train_plus_valid_for_test() -> None:
    split = _hand_split()
    train = np.zeros((3, 4))
    train[[0, 0, 1, 2, 2], [0, 1, 0, 0, 2]] = 1
    both = train.copy()
    both[[0, 1], [2, 3]] = 1
    np.testing.assert_array_equal(observed_interactions(split, "valid").toarray(), train)
    np.testing.assert_array_equal(observed_interactions(split, "test").toarray(), both)
    with pytest.raises(ValueError, match="part"):
        observed_interactions(split, "train")
    with pytest.raises(ValueError, match="part"):
        observed_times(split, "train")


def test_most_popular_counts_what_the_part_may_read() -> None:
    split = _hand_split()
    valid = fit_most_popular(observed_interactions(split, "valid"), {})(np.array([0]))
    test = fit_most_popular(observed_interactions(split, "test"), {})(np.array([0]))
    np.testing.assert_array_equal(valid, [[3, 1, 1, 0]])
    np.testing.assert_array_equal(test, [[3, 1, 2, 1]])


def test_keep_top_k_by_row_and_column_with_ties_to_the_lower_index() -> None:
    w = np.array([[3.0, 1.0, 3.0], [0.0, 2.0, 5.0], [4.0, 4.0, 1.0]])
    np.testing.assert_array_equal(keep_top_k(w, 1, axis=1), [[3, 0, 0], [0, 0, 5], [4, 0, 0]])
    np.testing.assert_array_equal(keep_top_k(w, 2, axis=0), [[3, 0, 3], [0, 2, 5], [4, 4, 0]])


def test_keep_top_k_refuses_k_0_and_breaks_long_runs_of_ties_by_index() -> None:
    with pytest.raises(ValueError, match="k=0"):
        keep_top_k(np.ones((2, 3)), 0, axis=1)
    # 30 tied entries: more than a small sort keeps in order by chance.
    w = np.ones((2, 30))
    w[1, 25] = 2.0
    kept = keep_top_k(w, 3, axis=1)
    assert np.flatnonzero(kept[0]).tolist() == [0, 1, 2]
    assert np.flatnonzero(kept[1]).tolist() == [0, 1, 25]
    np.testing.assert_array_equal(keep_top_k(w.T, 3, axis=0), kept.T)


def test_peers_read_interactions_as_binary() -> None:
    # Ratings and a repeated pair count once, as in the binary matrix every peer is fit on.
    # (data, indices, indptr) keeps user 1's two entries for item 0 as they are.
    rated = sp.csr_matrix(
        (np.array([5.0, 3.0, 4.0, 2.0]), np.array([0, 1, 0, 0]), np.array([0, 2, 4])),
        shape=(2, 3),
    )
    assert not rated.has_canonical_format
    popularity = fit_most_popular(rated, {})(np.array([0]))
    np.testing.assert_array_equal(popularity, [[2, 1, 0]])
    binary = sp.csr_matrix(np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    for fit, params in ((fit_item_knn, {"k": 2, "shrink": 1.0}), (fit_item_knn_sparse, {"k": 2})):
        np.testing.assert_allclose(
            fit(rated, params)(np.arange(2)), fit(binary, params)(np.arange(2)), rtol=1e-6
        )


def test_sparse_item_knn_scores_like_item_knn_without_shrink() -> None:
    # The hand example below with k = 1: item 1's nearest is item 2 (1/sqrt 2 > 0.5), so a user
    # holding only item 0 gets nothing for item 1, though item 1 is item 0's nearest.
    x = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=float))
    sparse = fit_item_knn_sparse(x, {"k": 1})(np.arange(3))
    dense = fit_item_knn(x, {"k": 1, "shrink": 0.0})(np.arange(3))
    np.testing.assert_allclose(sparse, dense, rtol=1e-6)
    r = 1 / np.sqrt(2)
    np.testing.assert_allclose(sparse, [[0.5, 0, r], [0, 0, 0], [0.5, r, r]], rtol=1e-6)


def test_item_knn_matches_a_brute_force_loop() -> None:
    x = _random_binary(0)
    k, shrink = 3, 2.0
    n = x.shape[1]
    sim = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                dot = float(x[:, i] @ x[:, j])
                norms = np.sqrt(x[:, i].sum()) * np.sqrt(x[:, j].sum())
                sim[i, j] = dot / (norms + shrink) if dot else 0.0
    ref = np.zeros_like(sim)
    for j in range(n):  # each target keeps its k most similar sources
        for i in sorted(range(n), key=lambda i: (-sim[i, j], i))[:k]:
            ref[i, j] = sim[i, j]
    got = item_knn_weights(sp.csr_matrix(x), k, shrink)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    scores = fit_item_knn(sp.csr_matrix(x), {"k": k, "shrink": shrink})(np.arange(5))
    np.testing.assert_allclose(scores, x[:5] @ ref, rtol=1e-5, atol=1e-6)


def test_item_knn_hand_example() -> None:
    # Items 0 and 1 share one of their two users: cosine 1 / (sqrt 2 sqrt 2) = 0.5.
    x = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=float))
    w = item_knn_weights(x, k=2, shrink=0.0)
    np.testing.assert_allclose(
        w, [[0, 0.5, 0], [0.5, 0, 1 / np.sqrt(2)], [0, 1 / np.sqrt(2), 0]], rtol=1e-6
    )


def test_rp3beta_matches_a_brute_force_random_walk() -> None:
    x = _random_binary(1)
    alpha, beta, k = 0.8, 0.3, 4
    users, n = x.shape
    deg_u, deg_i = x.sum(axis=1), x.sum(axis=0)
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j or deg_i[i] == 0 or deg_i[j] == 0:
                continue
            walk = sum(
                (x[u, i] / deg_i[i]) ** alpha * (x[u, j] / deg_u[u]) ** alpha
                for u in range(users)
                if x[u, i] and x[u, j]
            )
            w[i, j] = walk / deg_i[j] ** beta
    ref = np.zeros_like(w)
    for i in range(n):  # each source keeps its k strongest targets
        for j in sorted(range(n), key=lambda j: (-w[i, j], j))[:k]:
            ref[i, j] = w[i, j]
    np.testing.assert_allclose(rp3beta_weights(sp.csr_matrix(x), alpha, beta, k), ref, rtol=1e-5)


def test_score_part_reads_train_for_valid_and_train_plus_valid_for_test() -> None:
    split = split_random(
        interactions_of([(u, i) for u in range(20) for i in range(15) if (u * 7 + i * 3) % 4 == 0]),
        20,
        15,
        seed=0,
    )
    seen: list[np.ndarray] = []

    def fit(x: sp.csr_matrix, params: dict) -> object:
        seen.append(x.toarray())
        return fit_most_popular(x, params)

    score_part(fit, {}, split, "valid")
    score_part(fit, {}, split, "test")
    np.testing.assert_array_equal(seen[0], split.seen_for_valid().toarray())
    np.testing.assert_array_equal(seen[1], split.seen_for_test().toarray())


def test_evaluate_peer_selects_on_validation_and_refits_on_train_plus_valid() -> None:
    rng = np.random.default_rng(4)
    pairs = sorted(
        {
            (int(u), int(i))
            for u, i in zip(rng.integers(0, 60, 900), rng.integers(0, 25, 900), strict=True)
        }
    )
    split = split_random(interactions_of(pairs), 60, 25, seed=1)
    calls: list[tuple[float, int]] = []

    def fit(x: sp.csr_matrix, params: dict) -> object:
        calls.append((params["l2"], x.nnz))
        w = ease_weights(x, EaseConfig(l2=params["l2"]))
        return lambda users: np.asarray(x[users] @ w)

    peer = Peer("EASE", fit, {"l2": (1.0, 10.0, 100.0)})
    result = evaluate_peer(peer, split)
    n_train, n_both = split.seen_for_valid().nnz, split.seen_for_test().nnz
    assert calls[:3] == [(1.0, n_train), (10.0, n_train), (100.0, n_train)]
    best = max(result.trials, key=lambda t: t[1])[0]
    assert result.params == best
    assert calls[3] == (best["l2"], n_both)  # the test fit reads train + valid
    # The test metrics are those of EASE refit on train + valid with the chosen l2.
    metrics, per_user = score_part(fit, best, split, "test")
    assert result.test == metrics
    np.testing.assert_array_equal(result.test_per_user.values, per_user.values)
    assert result.test_per_user.mean == pytest.approx(result.test["ndcg@10"])


def test_evaluate_peers_refuses_two_peers_of_one_name_before_fitting() -> None:
    """A result dict by name would keep only the second; ALS and ALS_SMALL share a name."""
    fits: list[dict] = []

    def fit(x: sp.csr_matrix, params: dict) -> object:
        fits.append(params)
        return fit_most_popular(x, params)

    one, two = Peer("ALS", fit, {"a": (1,)}), Peer("ALS", fit, {"a": (2,)})
    with pytest.raises(ValueError, match=r"repeated: \['ALS'\]"):
        evaluate_peers(_hand_split(), peers=iter([one, Peer("pop", fit, {}), two]))
    assert fits == []
    found = evaluate_peers(_hand_split(), peers=iter([one, Peer("pop", fit, {})]))
    assert list(found) == ["ALS", "pop"] and found["ALS"].params == {"a": 1}


def test_selection_keeps_the_first_setting_on_a_tie_and_scores_only_users_with_items() -> None:
    split = _hand_split()
    # Most popular ignores its setting: every trial ties, and the first in grid order stays.
    result = evaluate_peer(Peer("most popular", fit_most_popular, {"unused": (1, 2, 3)}), split)
    assert len({value for _, value in result.trials}) == 1
    assert result.params == {"unused": 1}
    assert format_params(result.params) == "unused=1"
    assert format_params({}) == "-"
    # User 2 has no test item: asked for, it is left out rather than scored as a miss.
    no_test_2 = dataclasses.replace(split, test=interactions_of([(0, 3), (1, 1)]))
    fitted = fit_most_popular(observed_interactions(no_test_2, "test"), {})
    metrics, per_user = score_fitted(fitted, no_test_2, "test", k=2, users=np.arange(3))
    assert metrics["users"] == 2.0
    np.testing.assert_array_equal(per_user.users, [0, 1])


def test_the_pipeline_views_read_what_the_peers_read() -> None:
    from slimrank.data.dataset import FeatureTable
    from slimrank.pipeline.artifacts import DataArtifact
    from slimrank.retrieval.embeddings import history_for

    def timed(inter: Interactions) -> Interactions:  # distinct, non-zero timestamps
        return dataclasses.replace(inter, timestamp=np.arange(1, len(inter) + 1) * 10)

    hand = _hand_split()
    split = dataclasses.replace(
        hand, train=timed(hand.train), valid=timed(hand.valid), test=timed(hand.test)
    )
    data = DataArtifact(
        split,
        np.array(["a", "b", "c"]),
        np.arange(4).astype(str),
        FeatureTable.empty(3),
        FeatureTable.empty(4),
    )
    for part in ("valid", "test"):
        expected = observed_interactions(split, part).toarray()
        np.testing.assert_array_equal(data.seen(part).toarray(), expected)
        np.testing.assert_array_equal(data.seen_times(part).toarray() != 0, expected != 0)
        # Each (user, item)'s latest timestamp among the interactions the part may read.
        latest = np.zeros(expected.shape)
        for p in [split.train] if part == "valid" else [split.train, split.valid]:
            for u, i, t in zip(p.user, p.item, p.timestamp, strict=True):
                latest[u, i] = max(latest[u, i], t)
        np.testing.assert_array_equal(observed_times(split, part).toarray(), latest)
        hist = history_for(split, part)
        pooled = np.zeros_like(expected)
        for u in range(3):
            pooled[u, hist.items[hist.indptr[u] : hist.indptr[u + 1]]] = 1
        np.testing.assert_array_equal(pooled, expected)


def test_protocol_check_reads_train_only_but_excludes_train_and_valid() -> None:
    split = _hand_split()
    seen: list[int] = []

    def fit(x: sp.csr_matrix, params: dict) -> object:
        seen.append(x.nnz)
        return fit_most_popular(x, params)

    metrics = protocol_check(fit, {}, split, k=2)
    assert seen == [split.seen_for_valid().nnz]
    # Train counts i0 3, i1 1, i2 1, i3 0; test ranks what neither train nor valid holds:
    #   u0 -> [i3] (hit), u1 -> [i1, i2] (i1 hit at rank 1), u2 -> [i1, i3] (i3 at rank 2).
    assert metrics["users"] == 3
    assert metrics["hit@2"] == pytest.approx(1.0)
    assert metrics["mrr@2"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_item_item_peers_are_skipped_past_the_dense_limit() -> None:
    from slimrank.evaluation.peers import PEERS, peers_for

    kept, skipped = peers_for(1_000, max_items=2_000)
    assert kept == PEERS and skipped == ()
    assert peers_for(2_000, max_items=2_000) == (PEERS, ())  # up to and at the limit
    kept, skipped = peers_for(3_000, max_items=2_000)
    assert [p.name for p in kept] == ["most popular"]
    assert skipped == (
        "EASE (dense item-item matrices, past 2,000 items)",
        "item-KNN (dense item-item matrices, past 2,000 items)",
        "RP3beta (dense item-item matrices, past 2,000 items)",
        "ALS (implicit) (a grid of 27 fits tuned on ml-100k, past 2,000 items)",
    )


def test_a_peer_whose_extra_is_missing_is_skipped_and_named(monkeypatch) -> None:
    """Without the peers extra the small comparison runs the others and says why not ALS."""
    import importlib.util

    from slimrank.evaluation.peers import ALS_SMALL, PEERS, peers_for

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "implicit" else real(name, *a)
    )
    kept, skipped = peers_for(1_000)
    assert kept == tuple(p for p in PEERS if p is not ALS_SMALL)
    assert skipped == ("ALS (implicit) (implicit is not installed: the peers extra)",)


@pytest.mark.parametrize("threshold", [0.0, 1e9])
def test_peer_fits_show_progress_only_when_they_are_long(
    threshold: float, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from slimrank.evaluation import peers

    monkeypatch.setattr(peers, "PROGRESS_AFTER_S", threshold)
    rng = np.random.default_rng(5)
    pairs = sorted({(int(u), int(i)) for u, i in rng.integers(0, 20, (200, 2))})
    split = split_random(interactions_of(pairs), 20, 20, seed=1)
    peer = Peer("most popular", fit_most_popular, {"unused": (1, 2)})
    with caplog.at_level(logging.INFO, logger="slimrank.evaluation.peers"):
        result = evaluate_peer(peer, split)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    if threshold == 0.0:  # every fit counts as long: each setting and the refit, with its NDCG
        value = result.trials[1][1]
        assert (
            lines[1]
            == f"peer most popular, setting 2/2 (unused=2): valid NDCG@10 {value:.4f} in 0 s"
        )
        assert lines[2].startswith("peer most popular: refit on train + valid in 0 s, test NDCG@10")
        assert len(lines) == 3
    else:
        assert lines == []
