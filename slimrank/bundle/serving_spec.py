"""The serving contract of a ``pipeline`` bundle: ``serving.json``, one versioned, validated spec.

``slimrank pipeline`` writes it (:meth:`PipelineSpec.to_json`) and the server reads it
(:meth:`PipelineSpec.from_json`); both sides use this module, so the two cannot drift. It
names files of the bundle and sizes, never code: which featurizer and loader read the files is
decided by the ``format`` number, and a server refuses a format it does not know.

Format 2 ships top-K item-item neighbour tables and newest-first histories
(:mod:`slimrank.ranking.feature_io`); format 1 bundles (dense tables, module paths) must be
published again. Format 3 is format 2 plus ``index.transform``, the MIPS-to-L2 transform the
index was built over (``{"kind": "mips_l2", "max_norm": M}``, :mod:`slimrank.retrieval.mips`):
a bundle whose index has no transform is still written as format 2, so servers that predate
the transform read it, and refuse (by its format) one they could not search.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimrank.bundle.store import BundleError
from slimrank.retrieval.mips import parse_transform, transform_record

SERVING_JSON = "serving.json"
PIPELINE_KIND = "pipeline"
PIPELINE_FORMAT = 3  # the newest; written only for an index with a transform
PLAIN_FORMAT = 2  # no index transform
READ_FORMATS = (PLAIN_FORMAT, PIPELINE_FORMAT)


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = data.get(key)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BundleError(f"{where}[{key!r}] = {value!r}: expected {name}")
    return value


def _file(data: dict[str, Any], key: str, where: str) -> str:
    value = _get(data, key, str, where)
    parts = value.split("/")
    if not value or value.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"{where}[{key!r}] = {value!r}: expected a relative path in the bundle")
    return value


@dataclasses.dataclass(frozen=True)
class RankerSpec:
    """The int8 ONNX ranker: ``features`` (M, F) float32 -> ``scores`` (M,)."""

    file: str
    input_dim: int
    int8_mode: str = ""
    fp32_nodes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Which files of a ``pipeline`` bundle hold what, and the sizes they must have."""

    k: int
    candidates: int  # retrieved per request before ranking, as evaluated offline
    ranker: RankerSpec
    index_directory: str  # index.faiss, item_ids.npy, index.json
    user_ids: str  # (U,) unicode
    user_vectors: str  # (U, d) float32
    item_ids: str  # (I,) unicode
    item_vectors: str  # (I, d) float32
    popularity: str  # (I,) float32
    features_file: str  # safetensors of the feature tables
    features_layout: dict[str, Any]  # what slimrank.ranking.feature_io.load_tables needs
    user_tower: str | None = None  # two-tower model directory, for users known by items only
    teacher_version: str = ""
    # The search catalog's directory (slimrank.search.catalog); None: no text search.
    catalog_directory: str | None = None
    # max_norm of the MIPS-to-L2 transform the index is built over; None: no transform.
    index_transform_norm: float | None = None

    @property
    def format(self) -> int:
        """The ``format`` written: 3 with an index transform, else 2."""
        return PLAIN_FORMAT if self.index_transform_norm is None else PIPELINE_FORMAT

    def to_json(self) -> dict[str, Any]:
        """Return the ``serving.json`` object."""
        catalog = {"catalog": {"directory": self.catalog_directory}}
        index: dict[str, Any] = {"directory": self.index_directory, "metric": "ip"}
        if self.index_transform_norm is not None:
            index["transform"] = transform_record(self.index_transform_norm)
        return {
            "kind": PIPELINE_KIND,
            "format": self.format,
            "k": self.k,
            "candidates": self.candidates,
            "teacher_version": self.teacher_version,
            "ranker": {
                "file": self.ranker.file,
                "input": "features",
                "output": "scores",
                "input_dim": self.ranker.input_dim,
                "int8_mode": self.ranker.int8_mode,
                "fp32_nodes": list(self.ranker.fp32_nodes),
            },
            "index": index,
            "users": {"ids": self.user_ids, "vectors": self.user_vectors, "tower": self.user_tower},
            "items": {"ids": self.item_ids, "vectors": self.item_vectors},
            "popularity": self.popularity,
            "features": {"file": self.features_file, **self.features_layout},
            **(catalog if self.catalog_directory else {}),
        }

    @classmethod
    def from_json(cls, data: Any, where: str = SERVING_JSON) -> PipelineSpec:
        """Return the spec of a ``serving.json`` object; ``BundleError`` naming the bad field."""
        if not isinstance(data, dict):
            raise BundleError(f"{where}: expected a JSON object")
        if data.get("kind") != PIPELINE_KIND:
            raise BundleError(f"{where}: kind {data.get('kind')!r}, expected {PIPELINE_KIND!r}")
        fmt = data.get("format")
        if isinstance(fmt, bool) or fmt not in READ_FORMATS:
            raise BundleError(
                f"{where}: format {fmt!r}; this server reads formats "
                f"{' and '.join(map(str, READ_FORMATS))} (publish the bundle again with this "
                "version)"
            )
        sections = {}
        for name in ("ranker", "index", "users", "items", "features"):
            sections[name] = _get(data, name, dict, where)
        ranker, users, feats = sections["ranker"], sections["users"], sections["features"]
        k = _get(data, "k", int, where)
        n = _get(data, "candidates", int, where)
        dim = _get(ranker, "input_dim", int, f"{where}[ranker]")
        if k < 1 or n < 1 or dim < 1:
            raise BundleError(f"{where}: k {k}, candidates {n} and input_dim {dim} must be >= 1")
        for key in ("n_users", "n_items"):
            _get(feats, key, int, f"{where}[features]")
        names = _get(feats, "feature_names", list, f"{where}[features]")
        if len(names) != dim:
            raise BundleError(
                f"{where}: the ranker takes {dim} features, the tables name {len(names)}"
            )
        tower = users.get("tower")
        if tower is not None:
            tower = _file(users, "tower", f"{where}[users]")
        layout = {key: value for key, value in feats.items() if key != "file"}
        norm = _transform(sections["index"], fmt, f"{where}[index]")
        catalog = None
        if data.get("catalog") is not None:
            section = _get(data, "catalog", dict, where)
            catalog = _file(section, "directory", f"{where}[catalog]")
        return cls(
            k=k,
            candidates=n,
            ranker=RankerSpec(
                file=_file(ranker, "file", f"{where}[ranker]"),
                input_dim=dim,
                int8_mode=str(ranker.get("int8_mode", "")),
                fp32_nodes=tuple(str(x) for x in ranker.get("fp32_nodes", ())),
            ),
            index_directory=_file(sections["index"], "directory", f"{where}[index]"),
            user_ids=_file(users, "ids", f"{where}[users]"),
            user_vectors=_file(users, "vectors", f"{where}[users]"),
            item_ids=_file(sections["items"], "ids", f"{where}[items]"),
            item_vectors=_file(sections["items"], "vectors", f"{where}[items]"),
            popularity=_file(data, "popularity", where),
            features_file=_file(feats, "file", f"{where}[features]"),
            features_layout=layout,
            user_tower=tower,
            teacher_version=str(data.get("teacher_version", "")),
            catalog_directory=catalog,
            index_transform_norm=norm,
        )


def _transform(index: dict[str, Any], fmt: int, where: str) -> float | None:
    """Return the index transform's ``max_norm`` (None: none); format 3 must name it, format
    2 cannot."""
    record = index.get("transform")
    if fmt == PLAIN_FORMAT:
        if record is not None:
            raise BundleError(
                f"{where}['transform'] = {record!r}: format {PLAIN_FORMAT} has no index "
                f"transform (format {PIPELINE_FORMAT} does)"
            )
        return None
    if record is None:
        raise BundleError(f"{where}['transform']: missing (format {PIPELINE_FORMAT} needs it)")
    try:
        return parse_transform(record, f"{where}['transform']")
    except ValueError as err:
        raise BundleError(str(err)) from None
