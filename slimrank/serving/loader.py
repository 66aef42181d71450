"""Bundle -> :class:`ModelSnapshot`: a registry of loaders chosen by the bundle's ``serving.json``.

Every servable bundle holds ``serving.json`` with at least ``{"kind": "<name>"}``; the loader
registered under that kind turns the verified :class:`~slimrank.bundle.Bundle` into a
snapshot. Loaders only read files the bundle verified (``bundle.file``), with the pickle-free
readers of :mod:`slimrank.bundle.formats`.

The ``pipeline`` kind is what ``slimrank pipeline`` publishes (FAISS index, feature tables,
int8 ONNX ranker); :mod:`slimrank.serving.pipeline_loader` reads it. The ``flat`` kind is the
exact reference: item vectors searched with ``IndexFlatIP`` (built at load) and the dot +
popularity ranker of :func:`build_flat_snapshot`. Its files::

    serving.json       {"kind": "flat", "popularity_weight": 0.1}
    item_ids.npy       (n_items,) unicode
    items.npy          (n_items, d) float32
    popularity.npy     (n_items,) float32
    user_ids.npy       (n_users,) unicode
    user_vectors.npy   (n_users, d) float32
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from slimrank.bundle import Bundle, BundleError
from slimrank.bundle.formats import read_json, read_npy, write_json, write_npy
from slimrank.bundle.manifest import flat_metrics
from slimrank.bundle.serving_spec import PIPELINE_KIND
from slimrank.serving.snapshot import ModelMetadata, ModelSnapshot, build_flat_snapshot

log = logging.getLogger(__name__)

SERVING_JSON = "serving.json"
FLAT = "flat"
PIPELINE = PIPELINE_KIND

# A verified bundle -> the snapshot it describes; raises on anything it cannot serve.
SnapshotLoader = Callable[[Bundle], ModelSnapshot]


def bundle_metadata(bundle: Bundle) -> ModelMetadata:
    """Return the model metadata the bundle's manifest records (created, parent, metrics)."""
    manifest = bundle.manifest
    try:
        created: dt.datetime | None = dt.datetime.fromisoformat(manifest.created)
    except ValueError:
        created = None
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=dt.UTC)
    return ModelMetadata(
        created=created,
        parent_teacher_version=manifest.parent or "",
        metrics=flat_metrics(manifest.metrics),
    )


def serving_spec(bundle: Bundle) -> dict[str, object]:
    """Return the bundle's ``serving.json``; ``BundleError`` if absent or without a kind."""
    try:
        path = bundle.file(SERVING_JSON)
    except KeyError:
        raise BundleError(f"bundle {bundle.version} has no {SERVING_JSON}; not servable") from None
    spec = read_json(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise BundleError(f"{path}: must be an object with a string 'kind'")
    return spec


def load_flat(bundle: Bundle) -> ModelSnapshot:
    """Load a ``flat`` bundle: exact inner-product search and the dot + popularity ranker."""
    spec = serving_spec(bundle)
    weight = spec.get("popularity_weight", 0.1)
    if not isinstance(weight, int | float):
        raise BundleError(f"bundle {bundle.version}: popularity_weight {weight!r} is not a number")
    arrays = {
        name: read_npy(bundle.file(f"{name}.npy"))
        for name in ("item_ids", "items", "popularity", "user_ids", "user_vectors")
    }
    for name in ("item_ids", "user_ids"):
        if arrays[name].dtype.kind != "U":
            raise BundleError(f"bundle {bundle.version}: {name}.npy must hold unicode strings")
    try:
        return build_flat_snapshot(
            bundle.version,
            arrays["item_ids"],
            arrays["items"],
            arrays["user_ids"],
            arrays["user_vectors"],
            arrays["popularity"],
            bundle_metadata(bundle),
            popularity_weight=float(weight),
        )
    except ValueError as err:
        raise BundleError(f"bundle {bundle.version}: {err}") from err


def load_pipeline(bundle: Bundle) -> ModelSnapshot:
    """Load a ``pipeline`` bundle: see :mod:`slimrank.serving.pipeline_loader`."""
    # Imported here: it pulls in onnxruntime and FAISS, which `slimrank --help` skips.
    from slimrank.serving.pipeline_loader import load_pipeline_bundle

    return load_pipeline_bundle(bundle)


def default_loaders() -> Mapping[str, SnapshotLoader]:
    """Return the built-in loaders by kind (a fresh read-only map; extend with ``dict(...)``)."""
    return MappingProxyType({FLAT: load_flat, PIPELINE: load_pipeline})


def load_snapshot(
    bundle: Bundle, loaders: Mapping[str, SnapshotLoader] | None = None
) -> ModelSnapshot:
    """Return the snapshot of a verified bundle, loaded by the loader its kind names."""
    loaders = default_loaders() if loaders is None else loaders
    kind = serving_spec(bundle)["kind"]
    loader = loaders.get(str(kind))
    if loader is None:
        raise BundleError(
            f"bundle {bundle.version}: no loader for kind {kind!r} (known: {', '.join(loaders)})"
        )
    snapshot = loader(bundle)
    if snapshot.version != bundle.version:
        raise BundleError(
            f"loader {kind!r} returned version {snapshot.version!r} for bundle {bundle.version}"
        )
    log.info(
        "loaded %s (%s, %d items, dim %d)", bundle.version, kind, snapshot.n_items, snapshot.dim
    )
    return snapshot


def flat_bundle_writer(
    item_ids: Sequence[str],
    item_vectors: np.ndarray,
    user_ids: Sequence[str],
    user_vectors: np.ndarray,
    popularity: np.ndarray,
    popularity_weight: float = 0.1,
) -> Callable[[Path], None]:
    """Return a ``publish`` source that writes a ``flat`` bundle's files into a directory."""

    def write(directory: Path) -> None:
        write_json(directory / SERVING_JSON, {"kind": FLAT, "popularity_weight": popularity_weight})
        write_npy(directory / "item_ids.npy", np.asarray(item_ids, dtype=str))
        write_npy(directory / "items.npy", np.asarray(item_vectors, dtype=np.float32))
        write_npy(directory / "popularity.npy", np.asarray(popularity, dtype=np.float32))
        write_npy(directory / "user_ids.npy", np.asarray(user_ids, dtype=str))
        write_npy(directory / "user_vectors.npy", np.asarray(user_vectors, dtype=np.float32))

    return write


def random_flat_bundle(
    prefix: str = "i", n_items: int = 300, n_users: int = 40, dim: int = 8, seed: int = 0
) -> Callable[[Path], None]:
    """Return a ``publish`` source of a flat bundle over seeded Gaussian vectors.

    Item ids are ``{prefix}0..``, user ids ``u0..``; for tests and local trials.
    """
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n_items, dim)).astype(np.float32)  # (n_items, d)
    users = rng.standard_normal((n_users, dim)).astype(np.float32)  # (n_users, d)
    popularity = rng.zipf(1.5, n_items).astype(np.float32)  # (n_items,)
    return flat_bundle_writer(
        [f"{prefix}{i}" for i in range(n_items)],
        items,
        [f"u{u}" for u in range(n_users)],
        users,
        popularity,
    )
