"""The searchable catalog of a bundle: text index, filterable attributes and display titles.

Stored in a bundle directory (``catalog/`` by default), pickle-free and checksummed by the
bundle's manifest like every other file::

    catalog.json          format, BM25 parameters, vocabulary, attribute names and labels
    catalog.safetensors   the BM25 weights (CSR arrays) and the attribute arrays
    titles.npy            (items,) unicode display titles
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from slimrank.bundle.formats import (
    read_json,
    read_npy,
    read_tensors,
    write_json,
    write_npy,
    write_tensors,
)
from slimrank.search.filters import ItemAttributes
from slimrank.search.text_index import TextIndex

CATALOG_FORMAT = 1
CATALOG_JSON = "catalog.json"
CATALOG_TENSORS = "catalog.safetensors"
TITLES = "titles.npy"
CATALOG_FILES = (CATALOG_JSON, CATALOG_TENSORS, TITLES)


@dataclasses.dataclass(frozen=True, eq=False)
class Catalog:
    """What text search and filters read about the items (row = dense item index)."""

    text: TextIndex
    attributes: ItemAttributes
    titles: np.ndarray  # (items,) str
    fields: tuple[str, ...] = ()  # the item columns the text index was built from

    def __post_init__(self) -> None:
        n = self.text.n_items
        if self.attributes.n_items != n or self.titles.shape != (n,):
            raise ValueError(
                f"Catalog: text index of {n} items, attributes of {self.attributes.n_items}, "
                f"titles {self.titles.shape}"
            )

    @property
    def n_items(self) -> int:
        return self.text.n_items


def save_catalog(directory: str | Path, catalog: Catalog) -> None:
    """Write ``catalog`` into ``directory`` (created if needed)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    text, attrs = catalog.text, catalog.attributes
    tensors: dict[str, np.ndarray] = {
        "text.data": text.weights.data.astype(np.float32),
        "text.indices": text.weights.indices.astype(np.int64),
        "text.indptr": text.weights.indptr.astype(np.int64),
    }
    for name, (codes, _) in attrs.categorical.items():
        tensors[f"categorical.{name}"] = codes.astype(np.int64)
    for name, (matrix, _) in attrs.multi_label.items():
        tensors[f"multi_label.{name}"] = matrix.astype(np.uint8)
    for name, values in attrs.numeric.items():
        tensors[f"numeric.{name}"] = values.astype(np.float32)
    write_tensors(out / CATALOG_TENSORS, tensors)
    write_npy(out / TITLES, np.asarray(catalog.titles, dtype=str))
    write_json(
        out / CATALOG_JSON,
        {
            "format": CATALOG_FORMAT,
            "n_items": text.n_items,
            "fields": list(catalog.fields),
            "text": {"method": "lucene", "k1": text.k1, "b": text.b, "vocab": list(text.vocab)},
            "categorical": {name: list(v) for name, (_, v) in attrs.categorical.items()},
            "multi_label": {name: list(v) for name, (_, v) in attrs.multi_label.items()},
            "numeric": list(attrs.numeric),
        },
    )


def _spec(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("format") != CATALOG_FORMAT:
        raise ValueError(
            f"{where}: format {data.get('format') if isinstance(data, dict) else data!r}, "
            f"this version reads format {CATALOG_FORMAT}"
        )
    return data


def load_catalog(json_path: Path, tensors_path: Path, titles_path: Path) -> Catalog:
    """Return the catalog of the three files; ``ValueError`` naming the file if one is off."""
    spec = _spec(read_json(json_path), str(json_path))
    arrays = read_tensors(tensors_path)
    n = int(spec["n_items"])
    vocab = tuple(str(t) for t in spec["text"]["vocab"])
    try:
        weights = sp.csr_matrix(
            (arrays["text.data"], arrays["text.indices"], arrays["text.indptr"]),
            shape=(len(vocab), n),
        )
        attrs = ItemAttributes(
            n,
            categorical={
                name: (arrays[f"categorical.{name}"], tuple(labels))
                for name, labels in spec["categorical"].items()
            },
            multi_label={
                name: (arrays[f"multi_label.{name}"].astype(bool), tuple(labels))
                for name, labels in spec["multi_label"].items()
            },
            numeric={name: arrays[f"numeric.{name}"] for name in spec["numeric"]},
        )
        text = TextIndex(vocab, weights, float(spec["text"]["k1"]), float(spec["text"]["b"]))
    except KeyError as err:
        raise ValueError(f"{tensors_path}: missing array {err}") from None
    titles = read_npy(titles_path)
    return Catalog(text, attrs, titles, tuple(spec.get("fields", ())))


def load_catalog_dir(directory: str | Path) -> Catalog:
    """Return the catalog saved in ``directory`` (for offline use; servers go through bundles)."""
    d = Path(directory)
    return load_catalog(d / CATALOG_JSON, d / CATALOG_TENSORS, d / TITLES)
