"""Top-k agreement between a ranker and its reference, on hand-made lists."""

from __future__ import annotations

import numpy as np
import pytest

from slimrank.compression.agreement import same_top_k, top_k


def test_top_k_ranks_real_candidates_first_and_keeps_ties_in_list_order() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    mask = np.array([[True, True, True, True], [False, True, True, True]])
    np.testing.assert_array_equal(top_k(scores, 3, mask), [[1, 3, 2], [1, 2, 3]])
    with pytest.raises(ValueError, match=r"top_k\.k=5"):
        top_k(scores, 5)


def test_same_top_k_as_sets_and_in_order() -> None:
    reference = np.array(
        [
            [5.0, 4.0, 3.0, 2.0, 1.0],  # top-2 {0, 1}
            [5.0, 4.0, 3.0, 2.0, 1.0],
            [5.0, 4.0, 3.0, 2.0, 1.0],
            [5.0, 4.0, 3.0, 2.0, 1.0],
        ]
    )
    candidate = np.array(
        [
            [5.0, 4.0, 3.0, 2.0, 1.0],  # same set, same order
            [4.0, 5.0, 3.0, 2.0, 1.0],  # same set, swapped order
            [5.0, 3.0, 4.0, 2.0, 1.0],  # 10th/11th-style swap at the boundary: other set
            [1.0, 2.0, 3.0, 4.0, 5.0],  # reversed
        ]
    )
    assert same_top_k(reference, candidate, k=2) == 2 / 4
    assert same_top_k(reference, candidate, k=2, order=True) == 1 / 4
    assert same_top_k(reference, reference, k=2, order=True) == 1.0


def test_pads_never_count_and_short_lists_agree() -> None:
    reference = np.array([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    # List 0: a pad (index 3) would enter the candidate's top-2 if pads counted.
    # List 1: one real candidate only, so its top-2 is that candidate whatever the scores.
    candidate = np.array([[3.0, 2.0, 1.0, 9.0], [0.0, 2.0, 7.0, 9.0]])
    mask = np.array([[True, True, True, False], [True, False, False, False]])
    assert same_top_k(reference, candidate, k=2, mask=mask) == 1.0
    assert same_top_k(reference, candidate, k=2) == 0.0
    with pytest.raises(ValueError, match="reference's shape"):
        same_top_k(reference, candidate[:, :3], k=2)


def test_long_runs_of_ties_keep_list_order_and_no_lists_give_nan() -> None:
    # 30 tied scores: a non-stable sort reorders runs this long; the stable one never does.
    scores = np.zeros((2, 30))
    scores[1, 20] = 1.0
    np.testing.assert_array_equal(top_k(scores, 4), [[0, 1, 2, 3], [20, 0, 1, 2]])
    assert same_top_k(scores, np.zeros_like(scores), k=3) == 1 / 2
    assert np.isnan(same_top_k(np.zeros((0, 5)), np.zeros((0, 5)), k=2))
