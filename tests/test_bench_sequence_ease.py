"""EASE with neighbours in time (``bench/sequence_ease.py``), against hand-computed values."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from sequence_ease import ordered_rows, sequence_ease_weights, window_gram

from slimrank.evaluation.baselines import EaseConfig, ease_weights


def test_rows_are_ordered_by_time_with_ties_by_item() -> None:
    observed = sp.csr_matrix(np.array([[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]]))
    times = sp.csr_matrix(np.array([[30, 10, 20, 10], [5, 7, 0, 0], [0, 0, 0, 0]]))
    rows = ordered_rows(observed, times)
    assert [r.tolist() for r in rows] == [[1, 3, 2, 0], [1], []]


def test_window_gram_counts_pairs_within_the_window_with_decay() -> None:
    rows = [np.array([2, 0, 1]), np.array([3])]
    s1 = window_gram(rows, 4, window=1, decay=0.5)
    want1 = np.zeros((4, 4))
    want1[2, 0] = want1[0, 2] = want1[0, 1] = want1[1, 0] = 1.0
    np.testing.assert_array_equal(s1, want1)
    s2 = window_gram(rows, 4, window=2, decay=0.5)
    want2 = want1.copy()
    want2[2, 1] = want2[1, 2] = 0.5  # two positions apart: decay ** 1
    np.testing.assert_array_equal(s2, want2)
    # A window longer than any row counts each pair once; no row, no pairs.
    np.testing.assert_array_equal(window_gram(rows, 4, window=9, decay=0.5), want2)
    np.testing.assert_array_equal(window_gram([], 3, 2, 1.0), np.zeros((3, 3)))


def test_beta_zero_is_binary_ease() -> None:
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((40, 12)) < 0.3).astype(np.float64))
    got = sequence_ease_weights(x, np.zeros((12, 12)), beta=0.0, l2=7.0)
    np.testing.assert_allclose(got, ease_weights(x, EaseConfig(l2=7.0)), rtol=1e-5, atol=1e-6)


def test_weights_solve_the_constrained_ridge_regression_on_the_timed_gram() -> None:
    # EASE's B minimizes ||X - X B||^2 + l2 ||B||^2 with a zero diagonal; its stationarity
    # condition on a gram G is: (G + l2 I) B equals G off the diagonal. Here G is
    # X^T X + beta * S with the item counts on its diagonal.
    rng = np.random.default_rng(1)
    x = sp.csr_matrix((rng.random((60, 15)) < 0.3).astype(np.float64))
    times = sp.csr_matrix(x.multiply(rng.integers(1, 1000, size=x.shape)))
    s = window_gram(ordered_rows(x, times), 15, window=3, decay=0.8)
    assert s.any() and np.allclose(s, s.T)
    beta, l2 = 0.7, 5.0
    b = sequence_ease_weights(x, s, beta=beta, l2=l2)
    gram = (x.T @ x).toarray() + beta * s
    gram[np.diag_indices(15)] = np.asarray(x.sum(axis=0)).ravel()
    lhs = (gram + l2 * np.eye(15)) @ b
    off = ~np.eye(15, dtype=bool)
    np.testing.assert_allclose(lhs[off], gram[off], atol=1e-9)
    assert np.all(np.diag(b) == 0.0)
    # The time term changes the solution.
    assert not np.allclose(b, sequence_ease_weights(x, s, beta=0.0, l2=l2))
