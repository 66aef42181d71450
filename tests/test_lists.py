"""The students' standardization, computed in blocks of lists, against numpy on the whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimrank.compression.lists import ListData, pad_lists, standardization, standardized_lists


def lists(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(U, N, F) features on varied scales with padded tails; the pads hold huge values, so
    any pad that leaks into a statistic shows."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((23, 9, 5)) * [1.0, 1e3, 1e-3, 7.0, 0.0] + [0, 5, -2, 1e4, 3]
    values = values.astype(np.float32)
    mask = np.ones((23, 9), dtype=bool)
    for u, length in enumerate(rng.integers(0, 10, size=23)):
        mask[u, length:] = False
    values[~mask] = 1e30
    return values, mask


@pytest.mark.parametrize("block", [0, 1, 4, 23, 1000])
def test_the_statistics_are_those_of_the_real_candidates_in_float64(block: int) -> None:
    values, mask = lists()
    real = values[mask].astype(np.float64)
    mean, std = standardization(values, mask, block_lists=block)
    assert mean.dtype == std.dtype == np.float32
    np.testing.assert_allclose(mean, real.mean(axis=0).astype(np.float32), rtol=1e-6, atol=1e-9)
    want = real.std(axis=0)
    want[want <= 1e-6] = 1.0  # the constant column gets 1, not a tiny floor
    np.testing.assert_allclose(std, want.astype(np.float32), rtol=1e-6)
    assert std[4] == 1.0


def test_every_block_size_gives_the_same_statistics() -> None:
    values, mask = lists(seed=3)
    first = standardization(values, mask, block_lists=1)
    for block in (2, 5, 64):
        for a, b in zip(first, standardization(values, mask, block_lists=block), strict=True):
            np.testing.assert_array_equal(a, b)


def test_lists_without_a_real_candidate_get_the_identity() -> None:
    values, mask = lists()
    mean, std = standardization(values, np.zeros_like(mask))
    np.testing.assert_array_equal(mean, np.zeros(5, dtype=np.float32))
    np.testing.assert_array_equal(std, np.ones(5, dtype=np.float32))


@pytest.mark.parametrize("block", [0, 1, 3, 1000])
def test_standardized_lists_are_z_scores_with_zero_pads(block: int) -> None:
    values, mask = lists(seed=1)
    mean, std = standardization(values, mask)
    rng = np.random.default_rng(2)
    teacher = rng.standard_normal(mask.shape).astype(np.float32)
    labels = (rng.random(mask.shape) < 0.2).astype(np.float32)
    data = standardized_lists(values, mask, labels, teacher, mean, std, block_lists=block)
    x = data.features.numpy()
    assert x.dtype == np.float32 and x.shape == values.shape
    np.testing.assert_array_equal(x[mask], (values[mask] - mean) / std)
    assert not x[~mask].any()
    np.testing.assert_array_equal(data.teacher_scores.numpy(), np.where(mask, teacher, 0.0))
    np.testing.assert_array_equal(data.labels.numpy(), labels)
    np.testing.assert_array_equal(data.mask.numpy(), mask)


def test_pad_lists_pads_to_the_longest_list_and_checks_every_array() -> None:
    feats = [np.ones((2, 3), np.float32), np.full((4, 3), 2.0, np.float32)]
    scores = [np.array([1.0, 2.0]), np.array([3.0, 4.0, 5.0, 6.0])]
    labels = [np.array([1.0, 0.0]), np.array([0.0, 0.0, 1.0, 0.0])]
    data = pad_lists(feats, scores, labels)
    assert tuple(data.features.shape) == (2, 4, 3)
    assert data.mask.tolist() == [[True, True, False, False], [True] * 4]
    assert data.teacher_scores.tolist() == [[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 5.0, 6.0]]
    assert float(data.features[0, 2:].abs().sum()) == 0.0
    part = data.subset(torch.tensor([1]))  # every field's row, labels included
    assert part.labels.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    assert part.teacher_scores.tolist() == [[3.0, 4.0, 5.0, 6.0]]
    assert part.mask.tolist() == [[True] * 4] and float(part.features.sum()) == 24.0
    with pytest.raises(ValueError, match="list=1"):
        pad_lists(feats, scores, [labels[0], labels[1][:3]])  # one label short
    with pytest.raises(ValueError, match="mask"):
        ListData(data.features, data.teacher_scores, data.labels, data.mask.float())
