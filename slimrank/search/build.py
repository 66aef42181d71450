"""Build a :class:`~slimrank.search.catalog.Catalog` from a dataset's items (offline).

Each item's document is its text columns (MovieLens: the title, which carries the year), then
the labels of its categorical and multi-label features (MovieLens: its genres), so a query
for a genre finds the genre's items. Filterable attributes are the item feature table's
categorical, multi-label and numeric columns (a numeric column's ``<name>_missing`` flag makes
its missing values NaN, which no range filter passes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from slimrank.config import Config, require
from slimrank.data.dataset import FeatureTable
from slimrank.search.catalog import Catalog
from slimrank.search.filters import ItemAttributes
from slimrank.search.text_index import MatchConfig, build_text_index

UNKNOWN_LABEL = "[UNK]"


@dataclasses.dataclass(frozen=True)
class TextIndexConfig(Config):
    """BM25 parameters (Lucene's defaults)."""

    k1: float = 1.5
    b: float = 0.75

    def __post_init__(self) -> None:
        require(self.k1 >= 0, self, "k1", self.k1, "must be >= 0")
        require(0 <= self.b <= 1, self, "b", self.b, "must be in [0, 1]")


def item_attributes(table: FeatureTable) -> ItemAttributes:
    """Return the filterable attributes of an item feature table."""
    categorical = {}
    for name, codes in table.categorical.items():
        vocab = tuple(table.vocab.get(name) or [str(c) for c in range(table.cardinality[name])])
        categorical[name] = (np.asarray(codes, dtype=np.int64), vocab)
    multi = {
        name: (np.asarray(matrix) > 0, tuple(table.vocab.get(name, [])))
        for name, matrix in table.multi_hot.items()
    }
    numeric = {}
    for name, values in table.numeric.items():
        if name.endswith("_missing"):
            continue
        out = np.asarray(values, dtype=np.float32).copy()
        flag = table.numeric.get(f"{name}_missing")
        if flag is not None:
            out[np.asarray(flag) > 0] = np.nan
        numeric[name] = out
    return ItemAttributes(table.n_rows, categorical, multi, numeric)


def item_documents(
    text: Mapping[str, np.ndarray], attributes: ItemAttributes
) -> tuple[list[str], tuple[str, ...]]:
    """Return one document per item and the fields it was made of, in order."""
    n = attributes.n_items
    parts: list[list[str]] = [[] for _ in range(n)]
    fields = [*text]
    for values in text.values():
        for i, value in enumerate(values):
            parts[i].append(str(value))
    for name, (codes, vocab) in attributes.categorical.items():
        fields.append(name)
        for i, code in enumerate(codes):
            if code >= 0 and vocab[code] != UNKNOWN_LABEL:
                parts[i].append(vocab[code])
    for name, (matrix, labels) in attributes.multi_label.items():
        fields.append(name)
        for i, j in zip(*np.nonzero(matrix), strict=True):
            parts[i].append(labels[j])
    return [" ".join(p) for p in parts], tuple(fields)


def build_catalog(
    item_ids: np.ndarray,
    item_features: FeatureTable,
    text: Mapping[str, np.ndarray],
    titles: np.ndarray | None = None,
    config: TextIndexConfig | None = None,
) -> Catalog:
    """Return the catalog of items: text index, attributes and display titles.

    ``text`` maps text column names to ``(items,)`` strings; ``titles`` default to the first
    text column, else the item ids.
    """
    config = config or TextIndexConfig()
    attributes = item_attributes(item_features)
    documents, fields = item_documents(text, attributes)
    index = build_text_index(documents, config.k1, config.b, MatchConfig())
    if titles is None:
        titles = next(iter(text.values())) if text else np.asarray(item_ids)
    return Catalog(index, attributes, np.asarray(titles, dtype=str), fields)
