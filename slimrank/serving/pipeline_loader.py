"""Load a ``pipeline`` bundle (published by ``slimrank pipeline``) as a :class:`ModelSnapshot`.

``serving.json`` is a :class:`~slimrank.bundle.serving_spec.PipelineSpec`: which file holds
what. The snapshot serves what the pipeline evaluated offline on its test view:

- **resolve**: a known user's row of ``user_vectors`` (it pools train + valid history); a
  user the bundle does not know but who sends recent items gets the vector the bundle's
  two-tower user tower gives that history (:mod:`slimrank.serving.history_encoder`), or
  the mean of those items' vectors for bundles without the tower; a user with neither is
  served by popularity;
- **retrieve**: the tuned FAISS index searches ``candidates`` items, minus the items the
  user already has (train + valid: the protocol's exclusion); its scores are kept, as
  candidate mining kept them. An index built over the MIPS-to-L2 transform (the spec's
  ``index.transform``, format 3, which must match the index's own sidecar) gets the query
  transform and gives back inner products, the quantity the ranker's ``retrieval_score``
  feature was trained on (:class:`~slimrank.retrieval.index.RetrievalIndex`);
- **features**: :class:`~slimrank.serving.featurizer.RequestFeaturizer` over the bundle's
  feature tables (:mod:`slimrank.ranking.feature_io`);
- **score**: the int8 ONNX ranker.

Only the domain cores are imported here (retrieval, ranking, compression's scorer, bundle),
never the offline pipeline.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from slimrank.bundle import Bundle, BundleError
from slimrank.bundle.formats import read_json, read_npy
from slimrank.bundle.serving_spec import SERVING_JSON, PipelineSpec
from slimrank.errors import SlimrankError
from slimrank.search.catalog import CATALOG_FILES, load_catalog
from slimrank.serving.history_encoder import load_history_encoder
from slimrank.serving.loader import bundle_metadata
from slimrank.serving.snapshot import ModelSnapshot

if TYPE_CHECKING:
    from slimrank.retrieval.index import RetrievalIndex

log = logging.getLogger(__name__)

INDEX_FILES = ("index.faiss", "item_ids.npy", "index.json")


def _ids(bundle: Bundle, name: str) -> np.ndarray:
    ids = read_npy(bundle.file(name))
    if ids.ndim != 1 or ids.dtype.kind != "U":
        raise BundleError(f"bundle {bundle.version}: {name} must be a 1-d unicode array")
    return ids


def _vectors(bundle: Bundle, name: str, rows: int) -> np.ndarray:
    vectors = read_npy(bundle.file(name))
    if vectors.ndim != 2 or vectors.shape[0] != rows or vectors.dtype.kind != "f":
        raise BundleError(
            f"bundle {bundle.version}: {name} is {vectors.dtype} {vectors.shape}, expected "
            f"({rows}, d) floats"
        )
    return np.ascontiguousarray(vectors, dtype=np.float32)


@contextlib.contextmanager
def _unreadable(version: str, name: str) -> Iterator[None]:
    """Turn a reader's own error (onnxruntime's InvalidProtobuf, FAISS's RuntimeError) on a
    file that verified but does not parse into a ``BundleError`` naming the file."""
    try:
        yield
    except (SlimrankError, KeyError, ValueError):
        raise
    except Exception as err:
        raise BundleError(
            f"bundle {version}: {name} cannot be read: {type(err).__name__}: {err}"
        ) from err


def load_spec(bundle: Bundle) -> PipelineSpec:
    """Return the bundle's validated serving spec."""
    try:
        path = bundle.file(SERVING_JSON)
    except KeyError:
        raise BundleError(f"bundle {bundle.version} has no {SERVING_JSON}; not servable") from None
    return PipelineSpec.from_json(read_json(path), f"bundle {bundle.version}: {SERVING_JSON}")


def load_served_index(bundle: Bundle, spec: PipelineSpec) -> RetrievalIndex:
    """The bundle's retrieval index, read into memory.

    Not memory-mapped: FAISS's mapped IVF-Flat lists took ~24 page faults a query, 0.63 ms a
    search against 0.065 ms in memory on the 1M bundle (the fast-scan IVF-PQ index is read
    into memory either way).
    """
    from slimrank.retrieval.index_io import load_index

    with _unreadable(bundle.version, spec.index_directory):
        return load_index(bundle.path / spec.index_directory, mmap=False)


def load_pipeline_bundle(bundle: Bundle) -> ModelSnapshot:
    """Return the snapshot of a verified ``pipeline`` bundle; ``BundleError`` if it cannot serve."""
    from slimrank.compression.scorer import Scorer, ScorerConfig
    from slimrank.ranking.feature_io import load_tables
    from slimrank.serving.featurizer import RequestFeaturizer

    version = bundle.version
    spec = load_spec(bundle)
    try:
        for name in INDEX_FILES:
            bundle.file(f"{spec.index_directory}/{name}")  # KeyError unless verified
        item_ids, user_ids = _ids(bundle, spec.item_ids), _ids(bundle, spec.user_ids)
        item_vectors = _vectors(bundle, spec.item_vectors, len(item_ids))
        user_vectors = _vectors(bundle, spec.user_vectors, len(user_ids))
        popularity = read_npy(bundle.file(spec.popularity)).astype(np.float32)
        tables = load_tables(
            bundle.file(spec.features_file), spec.features_layout, user_vectors, item_vectors
        )
        ranker = spec.ranker.file
        with _unreadable(version, ranker):
            scorer = Scorer(
                bundle.file(ranker), bundle.manifest.files[ranker].sha256, ScorerConfig()
            )
        index = load_served_index(bundle, spec)
        encoder = None
        if spec.user_tower is not None:
            encoder = load_history_encoder(bundle, spec.user_tower)
        catalog = None
        if spec.catalog_directory is not None:
            catalog = load_catalog(
                *(bundle.file(f"{spec.catalog_directory}/{name}") for name in CATALOG_FILES)
            )
    except KeyError as err:
        raise BundleError(f"bundle {version}: missing {err}") from err
    except ValueError as err:
        raise BundleError(f"bundle {version}: {err}") from err
    if index.mips_norm != spec.index_transform_norm:
        raise BundleError(
            f"bundle {version}: {SERVING_JSON}[index]['transform'] has max_norm "
            f"{spec.index_transform_norm!r}, {spec.index_directory}/index.json has "
            f"{index.mips_norm!r} (None: no transform)"
        )
    if index.ntotal != len(item_ids) or not np.array_equal(
        index.item_ids, np.arange(len(item_ids))
    ):
        raise BundleError(
            f"bundle {version}: the index's {index.ntotal} ids are not the rows of "
            f"{len(item_ids)} items"
        )
    if (tables.n_users, tables.n_items) != (len(user_ids), len(item_ids)):
        raise BundleError(
            f"bundle {version}: feature tables of {tables.n_users} users x {tables.n_items} "
            f"items do not match {len(user_ids)} users x {len(item_ids)} items"
        )
    if scorer.input_dim != len(tables.feature_names):
        raise BundleError(
            f"bundle {version}: ranker takes {scorer.input_dim} features, the tables give "
            f"{len(tables.feature_names)}"
        )
    if encoder is not None and (encoder.n_items, encoder.dim) != item_vectors.shape:
        raise BundleError(
            f"bundle {version}: the two-tower gives {encoder.n_items} items x {encoder.dim} "
            f"dims, the bundle's vectors are {item_vectors.shape}"
        )
    log.info(
        "bundle %s: users known only by recent items get %s",
        version,
        "the two-tower user tower's vector of those items"
        if encoder is not None
        else "the mean of those items' vectors (no two-tower user tower pooling a history)",
    )
    try:
        return ModelSnapshot(
            version=version,
            item_ids=item_ids,
            item_vectors=item_vectors,
            user_ids=user_ids,
            user_vectors=user_vectors,
            popularity=popularity,
            search=index.search,
            featurize=RequestFeaturizer(tables),
            score=scorer.score,
            metadata=bundle_metadata(bundle),
            seen=tables.history,
            n_candidates=spec.candidates,
            encode_history=encoder,
            catalog=catalog,
        )
    except ValueError as err:
        raise BundleError(f"bundle {version}: {err}") from err
