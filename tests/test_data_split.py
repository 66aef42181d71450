"""The per-user random split: RecBole 1.2.1's counts, seeded and machine-independent."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from slimrank.data.dataset import Interactions, item_popularity, split_random
from slimrank.data.split import SplitConfig, part_sizes, split_parts


def _interactions(n_users: int = 30, seed: int | None = None) -> Interactions:
    """Return user u with 1 + (7 u mod 23) rows; ``timestamp`` is the row number."""
    counts = 1 + (7 * np.arange(n_users)) % 23  # 1..23 rows per user
    user = np.repeat(np.arange(n_users), counts)
    n = len(user)
    item = (np.arange(n) * 13) % 41
    return Interactions(user, item, np.ones(n, dtype=np.float32), np.arange(n))


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (1, [1, 0, 0]),  # first part keeps its single row
        (2, [1, 0, 1]),  # test takes one, then train is down to 1
        (3, [1, 1, 1]),
        (5, [3, 1, 1]),  # 0.5 rounds down to 0, then each later part borrows one
        (9, [7, 1, 1]),
        (10, [8, 1, 1]),
        (19, [17, 1, 1]),
        (20, [16, 2, 2]),
        (30, [24, 3, 3]),  # 0.1 * 30 = 3.0000000000000004 -> 3
    ],
)
def test_part_sizes_follow_recbole_rule(total: int, expected: list[int]) -> None:
    assert part_sizes(total, (0.8, 0.1, 0.1)) == expected


def test_part_sizes_normalize_the_ratios_and_leave_a_zero_part_empty() -> None:
    # Ratios are normalized first: 8:1:1 is 0.8/0.1/0.1.
    for total in (1, 2, 5, 9, 20, 30):
        assert part_sizes(total, (8, 1, 1)) == part_sizes(total, (0.8, 0.1, 0.1))
    # RecBole's borrowing is for parts with 0 < ratio * n < 1; a zero ratio stays empty.
    # n = 5, (0.9, 0.1, 0): valid's 0.5 borrows one from train, test has nothing to borrow.
    assert part_sizes(5, (0.9, 0.1, 0.0)) == [4, 1, 0]


def test_split_counts_per_user_follow_the_rule() -> None:
    inter = _interactions()
    split = split_random(inter, 30, 41, seed=7)
    per_user_total = np.bincount(inter.user, minlength=30)
    for part_index, part in enumerate((split.train, split.valid, split.test)):
        counts = np.bincount(part.user, minlength=30)
        expected = [part_sizes(int(t), (0.8, 0.1, 0.1))[part_index] for t in per_user_total]
        np.testing.assert_array_equal(counts, expected)


def test_split_is_a_partition_of_the_rows() -> None:
    inter = _interactions()
    split = split_random(inter, 30, 41, seed=1)
    rows = np.concatenate([split.train.timestamp, split.valid.timestamp, split.test.timestamp])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(inter)))
    # Each kept row keeps its own user and item.
    for part in (split.train, split.valid, split.test):
        np.testing.assert_array_equal(part.user, inter.user[part.timestamp])
        np.testing.assert_array_equal(part.item, inter.item[part.timestamp])


def test_same_seed_same_split_other_seed_other_split() -> None:
    inter = _interactions()
    a = split_random(inter, 30, 41, seed=2020)
    b = split_random(inter, 30, 41, seed=2020)
    c = split_random(inter, 30, 41, seed=2021)
    np.testing.assert_array_equal(a.test.timestamp, b.test.timestamp)
    np.testing.assert_array_equal(a.valid.timestamp, b.valid.timestamp)
    assert not np.array_equal(np.sort(a.test.timestamp), np.sort(c.test.timestamp))


def test_split_golden_hash() -> None:
    """Pins the split of a fixed input: a numpy or platform that changes it fails here."""
    split = split_random(_interactions(), 30, 41, seed=2020)
    digest = hashlib.sha256()
    for part in (split.train, split.valid, split.test):
        digest.update(part.timestamp.astype("<i8").tobytes())
        digest.update(b"|")
    assert digest.hexdigest() == GOLDEN_SPLIT_SHA256


GOLDEN_SPLIT_SHA256 = "cf444aa27450a44643845e4bd118f64e427343a0c1eb89ba75fc7721e196374a"


def test_split_parts_rejects_bad_ratios() -> None:
    with pytest.raises(ValueError, match="ratios"):
        split_parts(np.zeros(3, dtype=np.int64), (1.0,), seed=0)
    with pytest.raises(ValueError, match="ratios"):
        split_parts(np.zeros(3, dtype=np.int64), (0.8, -0.1, 0.3), seed=0)
    with pytest.raises(ValueError, match="ratios"):
        split_parts(np.zeros(3, dtype=np.int64), (0.0, 0.0, 0.0), seed=0)
    # A Split is train / valid / test: two ratios would silently leave the test part empty.
    with pytest.raises(ValueError, match="three ratios"):
        split_random(_interactions(), 30, 41, ratios=(0.9, 0.1))


def test_seen_matrices_and_popularity_use_the_right_parts() -> None:
    inter = _interactions()
    split = split_random(inter, 30, 41, seed=3)
    train, valid = split.train_matrix(), split.valid_matrix()
    seen_test = split.seen_for_test()
    assert (split.seen_for_valid() != train).nnz == 0
    expected = ((train + valid) > 0).astype(np.float32)
    assert (seen_test != expected).nnz == 0
    assert set(np.unique(seen_test.data)) == {1.0}
    pop = item_popularity(split.train, 41)
    assert pop.dtype == np.float32 and pop.shape == (41,)
    np.testing.assert_array_equal(pop, np.bincount(split.train.item, minlength=41))
    assert pop.sum() == len(split.train) < len(inter)


def test_split_config_checks_and_round_trips() -> None:
    config = SplitConfig(ratios=(0.7, 0.2, 0.1), seed=5)
    assert SplitConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"SplitConfig\.ratios"):
        SplitConfig(ratios=(0.8, 0.2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"SplitConfig\.ratios"):
        SplitConfig(ratios=(0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"SplitConfig\.seed=-1"):
        SplitConfig(seed=-1)
