"""Item filters against brute force, and the catalog's pickle-free round trip."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from slimrank.data.dataset import FeatureTable
from slimrank.search.build import (
    TextIndexConfig,
    build_catalog,
    item_attributes,
    item_documents,
)
from slimrank.search.catalog import load_catalog_dir, save_catalog
from slimrank.search.filters import FilterError, ItemAttributes, ItemFilter

GENRES = ["Action", "Comedy", "Drama"]
# item: (genre flags, year or None for missing, country)
ITEMS = [
    ((1, 0, 0), 1977, "us"),
    ((0, 1, 0), 1995, "fr"),
    ((0, 1, 1), 1995, "us"),
    ((0, 0, 1), None, "fr"),
    ((1, 1, 0), 2001, ""),
]


def table() -> FeatureTable:
    n = len(ITEMS)
    years = np.asarray([y or 1995 for _, y, _ in ITEMS], dtype=np.float32)
    missing = np.asarray([y is None for _, y, _ in ITEMS], dtype=np.float32)
    countries = ["[UNK]", "fr", "us"]
    codes = np.asarray([countries.index(c or "[UNK]") for *_, c in ITEMS], dtype=np.int64)
    return FeatureTable(
        n,
        categorical={"country": codes},
        cardinality={"country": 3},
        numeric={"release_year": years, "release_year_missing": missing},
        multi_hot={"genre": np.asarray([g for g, _, _ in ITEMS], dtype=np.float32)},
        vocab={"country": countries, "genre": GENRES},
    )


def brute(predicate: Callable[..., bool]) -> np.ndarray:
    return np.asarray([predicate(*item) for item in ITEMS])


def test_filters_keep_exactly_the_items_a_brute_force_check_keeps() -> None:
    attrs = item_attributes(table())
    assert attrs.mask([]) is None
    got = attrs.mask([ItemFilter("genre", ("Comedy", "Action"))])
    np.testing.assert_array_equal(got, brute(lambda g, y, c: bool(g[0] or g[1])))
    got = attrs.mask([ItemFilter("release_year", low=1990, high=1999)])
    np.testing.assert_array_equal(got, brute(lambda g, y, c: y is not None and 1990 <= y <= 1999))
    got = attrs.mask([ItemFilter("release_year", low=1990)])  # the missing year never passes
    np.testing.assert_array_equal(got, brute(lambda g, y, c: y is not None and y >= 1990))
    got = attrs.mask(
        [
            ItemFilter("genre", ("Comedy",)),
            ItemFilter("country", ("us",)),
            ItemFilter("release_year", high=2000),
        ]
    )
    np.testing.assert_array_equal(
        got, brute(lambda g, y, c: bool(g[1]) and c == "us" and y <= 2000)
    )


@pytest.mark.parametrize(
    ("filters", "field", "message"),
    [
        ([ItemFilter("colour", ("red",))], "filters[0].field", "unknown item attribute 'colour'"),
        (
            [ItemFilter("genre", ("Comedy",)), ItemFilter("genre", ("Comdy",))],
            "filters[1].any_of[0]",
            "'Comdy' is not a value of 'genre'",
        ),
        ([ItemFilter("genre", low=1)], "filters[0].min", "labels, not numbers"),
        ([ItemFilter("genre")], "filters[0].any_of", "needs values"),
        ([ItemFilter("release_year", ("1995",))], "filters[0].any_of", "numeric"),
        ([ItemFilter("release_year")], "filters[0]", "needs min or max"),
        ([ItemFilter("release_year", low=2000, high=1990)], "filters[0].min", "above max"),
        ([ItemFilter("release_year", high=float("nan"))], "filters[0].max", "finite"),
        ([ItemFilter("release_year", low=float("-inf"))], "filters[0].min", "finite"),
    ],
)
def test_bad_filters_name_the_field(filters: list[ItemFilter], field: str, message: str) -> None:
    with pytest.raises(FilterError, match=message) as info:
        item_attributes(table()).mask(filters)
    assert info.value.field == field


def test_documents_join_text_columns_and_labels() -> None:
    attrs = item_attributes(table())
    text = {"title": np.asarray([f"Title {i}" for i in range(len(ITEMS))])}
    docs, fields = item_documents(text, attrs)
    assert fields == ("title", "country", "genre")
    assert docs[2] == "Title 2 us Comedy Drama"
    assert docs[4] == "Title 4 Action Comedy"  # [UNK] country is not a word of the item


def test_the_catalog_round_trips_through_safetensors_json_and_npy(tmp_path: Path) -> None:
    titles = np.asarray([f"Title {i}" for i in range(len(ITEMS))])
    ids = np.arange(len(ITEMS)).astype(str)
    catalog = build_catalog(ids, table(), {"title": titles}, config=TextIndexConfig(1.2, 0.5))
    save_catalog(tmp_path / "catalog", catalog)
    assert sorted(p.name for p in (tmp_path / "catalog").iterdir()) == [
        "catalog.json",
        "catalog.safetensors",
        "titles.npy",
    ]
    back = load_catalog_dir(tmp_path / "catalog")
    assert back.text.vocab == catalog.text.vocab and back.fields == catalog.fields
    np.testing.assert_array_equal(back.text.weights.toarray(), catalog.text.weights.toarray())
    np.testing.assert_array_equal(back.titles, titles)
    assert (back.text.k1, back.text.b) == (catalog.text.k1, catalog.text.b) == (1.2, 0.5)
    for text in ("comedy", "title 3 drama", "dram"):
        np.testing.assert_array_equal(back.text.score(text), catalog.text.score(text))
    f = [ItemFilter("genre", ("Drama",)), ItemFilter("release_year", low=1990)]
    np.testing.assert_array_equal(back.attributes.mask(f), catalog.attributes.mask(f))
    assert np.isnan(back.attributes.numeric["release_year"][3])


def test_range_bounds_are_inclusive_and_any_of_keeps_every_listed_value() -> None:
    """min and max both keep items on the bound (min == max is one value); a categorical
    any_of keeps items with any of its values, checked against brute force."""
    attrs = item_attributes(table())
    got = attrs.mask([ItemFilter("release_year", low=1995)])
    np.testing.assert_array_equal(got, brute(lambda g, y, c: y is not None and y >= 1995))
    got = attrs.mask([ItemFilter("release_year", low=1995, high=1995)])
    np.testing.assert_array_equal(got, brute(lambda g, y, c: y == 1995))
    got = attrs.mask([ItemFilter("release_year", low=1977, high=2001)])
    np.testing.assert_array_equal(got, brute(lambda g, y, c: y is not None))
    got = attrs.mask([ItemFilter("country", ("fr", "us"))])
    np.testing.assert_array_equal(got, brute(lambda g, y, c: c in ("fr", "us")))


def test_a_missing_categorical_value_adds_no_word_and_codes_must_fit_the_vocabulary() -> None:
    """Code -1 (missing) is not read as the last label; a code past the vocabulary is refused."""
    vocab = ("fr", "us")
    attrs = ItemAttributes(3, categorical={"country": (np.array([0, -1, 1]), vocab)})
    docs, _ = item_documents({"title": np.array(["a", "b", "c"])}, attrs)
    assert docs == ["a fr", "b", "c us"]
    with pytest.raises(ValueError, match="'country' codes do not fit"):
        ItemAttributes(3, categorical={"country": (np.array([0, 2, 1]), vocab)})


def test_bm25_b_outside_0_1_and_a_catalog_of_another_format_are_refused(tmp_path: Path) -> None:
    """TextIndexConfig names a bad b; load_catalog_dir refuses a catalog.json of format 2."""
    import json
    import re

    with pytest.raises(ValueError, match=re.escape("TextIndexConfig.b=1.5")):
        TextIndexConfig(b=1.5)
    titles = np.asarray([f"Title {i}" for i in range(len(ITEMS))])
    catalog = build_catalog(titles, table(), {"title": titles})
    save_catalog(tmp_path, catalog)
    spec = json.loads((tmp_path / "catalog.json").read_text())
    (tmp_path / "catalog.json").write_text(json.dumps({**spec, "format": 2}))
    with pytest.raises(ValueError, match="format 2, this version reads format 1"):
        load_catalog_dir(tmp_path)
