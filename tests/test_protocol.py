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


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 60),
    st.integers(1, 14),
    st.sampled_from([1, 2, 3, 7, 128]),
    st.sampled_from([np.float32, np.float64]),
    st.floats(0.0, 0.95),
)
def test_topk_matches_a_full_sort_with_ties_exclusions_and_padding(
    seed: int, n_items: int, k: int, block: int, dtype: type, excluded: float
) -> None:
    """The block pre-selection gives what sorting every item on (-score, index) gives, with
    excluded items never ranked and -1 once a row runs out of rankable items, whatever the
    block size (1: a block per item; 128: as few blocks as k allows on these small rows)."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(-2, 3, size=(5, n_items)).astype(dtype)
    scores[rng.random(scores.shape) < 0.1] = -np.inf  # unrankable by score alone
    scores[rng.random(scores.shape) < 0.05] = np.inf
    exclude = sp.csr_matrix(rng.random(scores.shape) < excluded)
    expected = []
    for r, row in enumerate(scores):
        banned = set(exclude[r].indices.tolist())
        ranked = sorted(range(n_items), key=lambda i, row=row: (-row[i], i))
        ok = [i for i in ranked if i not in banned and row[i] != -np.inf][:k]
        expected.append(ok + [-1] * (k - len(ok)))
    assert topk_items(scores, k, exclude, block=block).tolist() == expected


def test_topk_of_a_large_catalog_matches_a_full_sort() -> None:
    """Real-valued scores over 50,000 items with a few planted ties at the top, many
    exclusions, a row excluded almost entirely and a row of equal scores: the default blocks
    give the full sort's top k."""
    rng = np.random.default_rng(7)
    n_items, k = 50_000, 10
    scores = rng.normal(size=(6, n_items))
    scores[0, [11, 40_000, 25]] = scores[0].max() + 1.0  # a three-way tie for first
    scores[1, ::3] = 0.5  # a tie across the whole row
    scores[2] = 1.0  # every item equal
    exclude = sp.lil_matrix(scores.shape, dtype=bool)
    exclude[3, : n_items - 4] = True  # four rankable items left
    exclude[4, rng.choice(n_items, 20_000, replace=False)] = True
    exclude[0, 25] = True  # one of the tied items is known
    exclude = sp.csr_matrix(exclude)
    got = topk_items(scores, k, exclude)
    for r in range(len(scores)):
        banned = np.zeros(n_items, dtype=bool)
        banned[exclude[r].indices] = True
        order = np.lexsort((np.arange(n_items), -scores[r]))
        want = [int(i) for i in order if not banned[i]][:k]
        assert got[r].tolist() == want + [-1] * (k - len(want)), r
    assert got[0, :2].tolist() == [11, 40_000]
    assert got[3].tolist()[4:] == [-1] * 6
