"""The full-ranking protocol: exclusion of known items, tie order, users counted."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from slimrank.evaluation.metrics import ranking_metrics
from slimrank.evaluation.protocol import evaluate_full_ranking, rank_users, topk_items


def test_topk_excludes_known_items_and_breaks_ties_by_index() -> None:
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1]])
    exclude = sp.csr_matrix(np.array([[0, 1, 0, 0, 0]]))
    assert topk_items(scores, 4, exclude).tolist() == [[3, 0, 2, 4]]


def test_topk_pads_when_too_few_items_remain() -> None:
    exclude = sp.csr_matrix(np.array([[1, 0, 1]]))
    assert topk_items(np.array([[3.0, 2.0, 1.0]]), 3, exclude).tolist() == [[1, -1, -1]]
    assert topk_items(np.array([[3.0, 2.0]]), 4).tolist() == [[0, 1, -1, -1]]


def test_topk_rejects_nan_and_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="NaN"):
        topk_items(np.array([[np.nan, 1.0]]), 1)
    with pytest.raises(ValueError, match="shape"):
        topk_items(np.ones((1, 3)), 1, sp.csr_matrix((2, 3)))


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_ranking_is_invariant_to_the_order_of_tied_items(seed: int) -> None:
    # Scores with many ties: relabelling items, ranking, and mapping back must give the same
    # top-k as a sort on (-score, item index), which is the documented tie rule.
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=(4, 12)).astype(float)
    expected = np.array([sorted(range(12), key=lambda i, r=r: (-r[i], i))[:5] for r in scores])
    assert topk_items(scores, 5).tolist() == expected.tolist()
    # The metric values depend only on the ranking, so a batch split does not change them.
    truth = sp.csr_matrix((rng.random((4, 12)) < 0.3).astype(np.float32))
    one = rank_users(lambda u: scores[u], np.arange(4), sp.csr_matrix((4, 12)), 5, batch_size=4)
    two = rank_users(lambda u: scores[u], np.arange(4), sp.csr_matrix((4, 12)), 5, batch_size=1)
    assert ranking_metrics(one, truth, (5,)) == ranking_metrics(two, truth, (5,))


def test_evaluate_counts_only_users_with_truth_and_excludes_seen() -> None:
    # 3 users x 4 items. The scorer prefers item 0, which user 0 has already seen in training.
    train = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    test = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float32))
    item_scores = np.array([4.0, 3.0, 2.0, 1.0])
    metrics = evaluate_full_ranking(
        lambda users: np.tile(item_scores, (len(users), 1)), test, train, ks=(1, 4)
    )
    assert metrics["users"] == 2
    # User 0: item 0 excluded, so item 1 is ranked first: a hit at rank 1.
    # User 2: ranking [0, 1, 2, 3], its item 3 at rank 4.
    assert metrics["hit@1"] == pytest.approx(0.5)
    assert metrics["mrr@4"] == pytest.approx((1 + 1 / 4) / 2)


def test_score_fn_with_wrong_shape_is_an_error() -> None:
    truth = sp.csr_matrix(np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match="score_fn returned shape"):
        evaluate_full_ranking(lambda users: np.zeros((len(users), 3)), truth, sp.csr_matrix((2, 2)))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 15), st.integers(1, 14))
def test_topk_matches_a_full_sort_with_ties_exclusions_and_padding(
    seed: int, n_items: int, k: int
) -> None:
    """The partial selection gives what sorting every item on (-score, index) gives, with
    excluded items never ranked and -1 once a row runs out of rankable items."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(-2, 3, size=(5, n_items)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.1] = -np.inf  # unrankable by score alone
    exclude = sp.csr_matrix(rng.random(scores.shape) < 0.4)
    expected = []
    for r, row in enumerate(scores):
        banned = set(exclude[r].indices.tolist())
        ranked = sorted(range(n_items), key=lambda i, row=row: (-row[i], i))
        ok = [i for i in ranked if i not in banned and row[i] != -np.inf][:k]
        expected.append(ok + [-1] * (k - len(ok)))
    assert topk_items(scores, k, exclude).tolist() == expected
