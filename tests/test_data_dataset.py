"""Id maps, interactions, feature tables and the feature builders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slimrank.data.dataset import Dataset, FeatureTable, IdMap, Interactions
from slimrank.data.features import (
    UNKNOWN,
    age_buckets,
    categorical_codes,
    multi_hot,
    numeric_with_missing,
    table_from_frame,
)


def test_idmap_keeps_first_seen_order_and_round_trips() -> None:
    ids = IdMap.from_ids(["b", "a", "b", "c", "a"])
    assert len(ids) == 3
    assert list(ids.ids) == ["b", "a", "c"]
    np.testing.assert_array_equal(ids.index(["c", "b"]), [2, 0])
    assert ids.index(["a"]).dtype == np.int64
    assert list(ids.external([2, 0, 1])) == ["c", "b", "a"]
    # Integer external ids are strings once in the map.
    nums = IdMap.from_ids(np.array([10, 7, 10]))
    np.testing.assert_array_equal(nums.index([7, "10"]), [1, 0])


def test_idmap_unknown_modes() -> None:
    ids = IdMap.from_ids(["x", "y"])
    with pytest.raises(KeyError, match="'z'"):
        ids.index(["y", "z"])
    np.testing.assert_array_equal(ids.index(["y", "z", "x"], unknown="drop"), [1, 0])
    np.testing.assert_array_equal(ids.index(["y", "z", "x"], unknown="minus_one"), [1, -1, 0])
    with pytest.raises(ValueError, match="unknown="):
        ids.index(["x"], unknown="ignore")  # type: ignore[arg-type]


def test_idmap_rejects_repeats_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="unique"):
        IdMap(["a", "a"])
    ids = IdMap(["a", "b"])
    with pytest.raises(IndexError):
        ids.external([2])
    with pytest.raises(IndexError):
        ids.external([-1])


def test_interactions_take_and_binary_matrix() -> None:
    inter = Interactions(
        user=np.array([0, 0, 1, 0]),
        item=np.array([1, 1, 2, 0]),
        rating=np.array([5, 3, 1, 2]),
        timestamp=np.array([1, 2, 3, 4]),
    )
    assert inter.rating.dtype == np.float32 and inter.user.dtype == np.int64
    m = inter.matrix(3, 4)
    assert m.shape == (3, 4) and m.dtype == np.float32
    # The repeated (0, 1) pair counts once; ratings do not leak into the matrix.
    np.testing.assert_array_equal(m.toarray(), [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    sub = inter.take(np.array([3, 1]))
    np.testing.assert_array_equal(sub.timestamp, [4, 2])
    masked = inter.take(inter.user == 1)
    assert len(masked) == 1 and masked.item[0] == 2
    with pytest.raises(ValueError, match="length"):
        Interactions(np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2))


def test_feature_table_checks_shapes_and_codes() -> None:
    ok = FeatureTable(2, {"g": np.array([0, 1])}, {"g": 2})
    assert ok.names == ["g"]
    with pytest.raises(ValueError, match="outside"):
        FeatureTable(2, {"g": np.array([0, 2])}, {"g": 2})
    with pytest.raises(ValueError, match="cardinality"):
        FeatureTable(2, {"g": np.array([0, 1])}, {})
    with pytest.raises(ValueError, match="shape"):
        FeatureTable(3, numeric={"x": np.zeros(2, dtype=np.float32)})


def test_categorical_codes_reserve_zero_for_unknown() -> None:
    codes, vocab = categorical_codes(["b", None, "a", "", "b"])
    assert vocab == [UNKNOWN, "a", "b"]
    np.testing.assert_array_equal(codes, [2, 0, 1, 0, 2])
    codes, vocab = categorical_codes(["hi", "lo", "mid"], order=("lo", "hi"))
    assert vocab == [UNKNOWN, "lo", "hi"]
    np.testing.assert_array_equal(codes, [2, 1, 0])


def test_multi_hot_numeric_and_age_buckets() -> None:
    matrix, vocab = multi_hot([["b", "a"], [], ["b"]])
    assert vocab == ["a", "b"]
    np.testing.assert_array_equal(matrix, [[1, 1], [0, 0], [0, 1]])
    filled, missing = numeric_with_missing(np.array([1.0, np.nan, 5.0, 2.0]))
    np.testing.assert_array_equal(filled, [1, 2, 5, 2])  # median of 1, 5, 2
    np.testing.assert_array_equal(missing, [0, 1, 0, 0])
    labels = age_buckets(np.array([7, 17, 18, 24, 25, 49, 50, 55, 56, 73, np.nan]))
    assert list(labels) == [
        "<18", "<18", "18-24", "18-24", "25-34", "45-49", "50-55", "50-55", "56+", "56+", None,
    ]  # fmt: skip


def test_table_from_frame_types_and_alignment() -> None:
    frame = pd.DataFrame(
        {
            "age": [30.0, np.nan],
            "tags": ["a|b", "c"],
            "city": ["paris", None],
        }
    )
    # Feature rows describe ids 2 and 0 of 3; id 1 has no row.
    table = table_from_frame(frame, np.array([2, 0]), 3)
    assert table.n_rows == 3
    np.testing.assert_array_equal(table.numeric["age"], [30, 30, 30])
    np.testing.assert_array_equal(table.numeric["age_missing"], [1, 1, 0])
    assert table.vocab["tags"] == ["a", "b", "c"]
    np.testing.assert_array_equal(table.multi_hot["tags"], [[0, 0, 1], [0, 0, 0], [1, 1, 0]])
    assert table.vocab["city"] == [UNKNOWN, "paris"]
    np.testing.assert_array_equal(table.categorical["city"], [0, 0, 1])
    assert table.cardinality["city"] == 2


def test_piped_multi_hot_ignores_empty_tokens() -> None:
    """``"a||b"``, a trailing ``"|"`` or a lone ``"|"`` add no empty-string column."""
    frame = pd.DataFrame({"tags": ["a||b", "c|", "|"]})
    table = table_from_frame(frame, np.array([0, 1, 2]), 3)
    assert table.vocab["tags"] == ["a", "b", "c"]
    np.testing.assert_array_equal(table.multi_hot["tags"], [[1, 1, 0], [0, 0, 1], [0, 0, 0]])


def test_dataset_checks_indices_and_table_sizes() -> None:
    inter = Interactions(np.array([0, 1]), np.array([0, 2]), np.ones(2), np.zeros(2))
    users, items = IdMap(["a", "b"]), IdMap(["x", "y", "z"])
    ds = Dataset("d", users, items, inter, FeatureTable.empty(2), FeatureTable.empty(3))
    assert (ds.n_users, ds.n_items) == (2, 3)
    with pytest.raises(ValueError, match="item indices"):
        # Item index 2 in a catalog of 2: one past the end is out of range too.
        Dataset("d", users, IdMap(["x", "y"]), inter, FeatureTable.empty(2), FeatureTable.empty(2))
    with pytest.raises(ValueError, match="user_features"):
        Dataset("d", users, items, inter, FeatureTable.empty(5), FeatureTable.empty(3))


def test_standardized_numeric_columns() -> None:
    table = FeatureTable(
        3,
        numeric={
            "year": np.array([1990, 2000, 2010], dtype=np.float32),
            "flat": np.array([5, 5, 5], dtype=np.float32),
            "year_missing": np.array([0, 1, 0], dtype=np.float32),
        },
    )
    out = table.standardized()
    np.testing.assert_allclose(out.numeric["year"], [-np.sqrt(1.5), 0, np.sqrt(1.5)], rtol=1e-6)
    np.testing.assert_array_equal(out.numeric["flat"], [0, 0, 0])
    np.testing.assert_array_equal(out.numeric["year_missing"], [0, 1, 0])
    np.testing.assert_array_equal(table.numeric["year"], [1990, 2000, 2010])  # a copy
