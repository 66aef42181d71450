"""IdIndex (sorted ids + binary search) answers every lookup as a dict of the same ids does."""

from __future__ import annotations

import numpy as np
import pytest

from slimrank.serving.id_index import IdIndex


def _seeded_ids(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 12, n)
    alphabet = np.array(list("ab0é_-Z9"))
    ids = {"".join(rng.choice(alphabet, size)) for size in lengths}
    return sorted(ids, key=lambda _: rng.random())  # unique, in no particular order


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lookups_match_a_dict_of_the_same_ids(seed: int) -> None:
    ids = _seeded_ids(3000, seed)
    reference = {item: row for row, item in enumerate(ids)}
    index = IdIndex(np.asarray(ids, dtype=str))
    rng = np.random.default_rng(seed + 10)
    held = list(rng.choice(np.asarray(ids, dtype=object), 200))
    # Unknown ids around the held ones: prefixes, extensions past the array's width, and NUL
    # endings (numpy drops a trailing NUL, a dict does not).
    width = max(len(i) for i in ids)
    unknown = [i + "x" for i in held[:50]] + [i[:-1] for i in held[:50] if i]
    unknown += ["z" * (width + 3), "ab" + "0" * (width + 1), held[0] + "\x00", "\x00"]
    unknown = [i for i in unknown if i not in reference]
    assert unknown
    queries = held + unknown
    rng.shuffle(queries)
    expected = np.asarray([reference.get(q, -1) for q in queries], dtype=np.int64)
    np.testing.assert_array_equal(index.rows(queries), expected)
    for q in queries:
        assert index.row(q) == reference.get(q, -1), repr(q)
        assert (q in index) == (q in reference), repr(q)
        assert index.get(q, -1) == reference.get(q, -1), repr(q)
    assert len(index) == len(reference)
    assert list(index) == ids
    assert dict(index) == reference
    with pytest.raises(KeyError):
        index[unknown[0]]


def test_empty_queries_and_an_empty_index() -> None:
    index = IdIndex(np.asarray(["b", "a"]))
    assert index.rows([]).dtype == np.int64 and index.rows([]).shape == (0,)
    np.testing.assert_array_equal(index.rows(["a", "a", "c", "b"]), [1, 1, -1, 0])
    np.testing.assert_array_equal(index.rows(["b"]), [0])  # one key; row 0 is a row
    assert "b" in index and index["b"] == 0 and index.row("b") == 0
    empty = IdIndex(np.empty(0, dtype=str))
    assert len(empty) == 0 and "a" not in empty and empty.row("") == -1
    np.testing.assert_array_equal(empty.rows(["a", ""]), [-1, -1])


def test_refuses_repeated_ids_and_non_strings() -> None:
    with pytest.raises(ValueError, match="not unique"):
        IdIndex(np.asarray(["a", "b", "a"]))
    with pytest.raises(ValueError, match="not unique"):
        IdIndex(np.asarray(["a", "a"]))
    with pytest.raises(ValueError, match="unicode"):
        IdIndex(np.arange(3))
    with pytest.raises(ValueError, match="unicode"):
        IdIndex(np.asarray([["a"], ["b"]]))
