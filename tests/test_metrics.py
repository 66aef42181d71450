"""Ranking metrics against hand-computed values, plus properties that must hold for any input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from slimrank.evaluation.metrics import auc, grouped_auc, per_user_metrics, ranking_metrics


def truth_of(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    data = np.zeros((len(rows), n_items), dtype=np.float32)
    for u, items in enumerate(rows):
        data[u, items] = 1
    return sp.csr_matrix(data)


def test_hand_computed_two_users() -> None:
    # User 0 has items {0, 2}; its ranking [0, 1, 2] hits at ranks 1 and 3.
    # User 1 has no relevant item and is left out. User 2 has {1}; [3, 2, 1] hits at rank 3.
    truth = truth_of([[0, 2], [], [1]], 4)
    topk = np.array([[0, 1, 2], [0, 1, 2], [3, 2, 1]])
    m = ranking_metrics(topk, truth, ks=(2, 3))
    ndcg_u0_at3 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    ndcg_u2_at3 = (1 / math.log2(4)) / 1.0
    assert m["ndcg@3"] == pytest.approx((ndcg_u0_at3 + ndcg_u2_at3) / 2)
    assert m["ndcg@2"] == pytest.approx((1 / (1 + 1 / math.log2(3))) / 2)
    assert m["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["mrr@2"] == pytest.approx(0.5)
    assert m["hit@2"] == pytest.approx(0.5)
    assert m["hit@3"] == pytest.approx(1.0)


def test_ideal_dcg_is_capped_at_k() -> None:
    # Five relevant items, K = 2, both top items relevant: NDCG is 1, recall is 2/5.
    truth = truth_of([[0, 1, 2, 3, 4]], 6)
    per_user = per_user_metrics(np.array([[3, 1]]), truth, k=2)
    assert per_user["ndcg"][0] == pytest.approx(1.0)
    assert per_user["recall"][0] == pytest.approx(0.4)


def test_padding_never_counts_as_a_hit() -> None:
    truth = truth_of([[0]], 3)
    m = ranking_metrics(np.array([[-1, -1, 0]]), truth, ks=(3,))
    assert m["mrr@3"] == pytest.approx(1 / 3)


def test_rejects_out_of_range_items_and_wrong_rows() -> None:
    truth = truth_of([[0]], 3)
    with pytest.raises(ValueError, match="outside"):
        ranking_metrics(np.array([[3]]), truth, ks=(1,))
    with pytest.raises(ValueError, match="rows"):
        ranking_metrics(np.array([[0], [1]]), truth, ks=(1,))
    with pytest.raises(ValueError, match="columns"):
        ranking_metrics(np.array([[0]]), truth, ks=(2,))


@st.composite
def rankings(draw: st.DrawFn) -> tuple[np.ndarray, sp.csr_matrix, int]:
    n_items = draw(st.integers(2, 30))
    n_users = draw(st.integers(1, 8))
    k = draw(st.integers(1, n_items))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    truth = (rng.random((n_users, n_items)) < draw(st.floats(0.05, 0.6))).astype(np.float32)
    truth[rng.integers(n_users), rng.integers(n_items)] = 1  # at least one user counts
    topk = np.stack([rng.permutation(n_items)[:k] for _ in range(n_users)])
    return topk, sp.csr_matrix(truth), k


@settings(max_examples=60, deadline=None)
@given(rankings())
def test_metrics_lie_in_unit_interval(case: tuple[np.ndarray, sp.csr_matrix, int]) -> None:
    topk, truth, k = case
    for name, value in ranking_metrics(topk, truth, ks=(k,)).items():
        assert 0.0 <= value <= 1.0 + 1e-12, name


@settings(max_examples=60, deadline=None)
@given(rankings())
def test_perfect_ranking_scores_one(case: tuple[np.ndarray, sp.csr_matrix, int]) -> None:
    _, truth, k = case
    dense = truth.toarray()
    # Relevant items first: NDCG, MRR and Hit are 1; Recall is 1 wherever it can be.
    order = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    per_user = per_user_metrics(order, truth, k)
    assert np.allclose(per_user["ndcg"], 1.0)
    assert np.allclose(per_user["mrr"], 1.0)
    assert np.allclose(per_user["hit"], 1.0)
    n_rel = dense.sum(axis=1)
    n_rel = n_rel[n_rel > 0]
    assert np.allclose(per_user["recall"], np.minimum(n_rel, k) / n_rel)


@settings(max_examples=40, deadline=None)
@given(rankings(), st.integers(0, 2**32 - 1))
def test_user_order_does_not_matter(case: tuple[np.ndarray, sp.csr_matrix, int], seed: int) -> None:
    topk, truth, k = case
    perm = np.random.default_rng(seed).permutation(len(topk))
    a = ranking_metrics(topk, truth, ks=(k,))
    b = ranking_metrics(topk[perm], truth[perm], ks=(k,))
    assert a == pytest.approx(b)


def test_auc_counts_ties_as_half() -> None:
    # Positive scores .9, .5; negative .1, .5: pairs won 1 + 1 + 1 + 0.5 of 4.
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.5, 0.5])) == pytest.approx(0.875)
    assert auc(np.array([1, 0]), np.array([0.0, 1.0])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="positive and one negative"):
        auc(np.array([1, 1]), np.array([0.1, 0.2]))


def test_grouped_auc_averages_groups_with_both_labels() -> None:
    groups = np.array([7, 7, 3, 3, 3, 9])  # group 9 has one label only: left out
    labels = np.array([1, 0, 1, 0, 0, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.2, 0.5])
    # Group 7: 1.0. Group 3: positive .2 vs negatives .3 (lost) and .2 (tie): 0.5 / 2.
    assert grouped_auc(groups, labels, scores) == pytest.approx((1.0 + 0.25) / 2)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_grouped_auc_matches_per_group_auc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 5, size=60)
    labels = rng.integers(0, 2, size=60)
    scores = rng.integers(0, 4, size=60).astype(float)  # many ties
    expected = [
        auc(labels[groups == g], scores[groups == g])
        for g in np.unique(groups)
        if 0 < labels[groups == g].sum() < (groups == g).sum()
    ]
    if expected:
        assert grouped_auc(groups, labels, scores) == pytest.approx(np.mean(expected))
