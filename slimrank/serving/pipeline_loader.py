"""Load a ``pipeline`` bundle (published by ``slimrank pipeline``) as a :class:`ModelSnapshot`.

The snapshot serves what the pipeline evaluated offline on its test view: the tuned FAISS
index retrieves ``serving.json["candidates"]`` items for the user's vector (a known user's row
of ``user_vectors``, which pools train + valid history), minus the items the user already has
(the bundle's history table, train + valid: the protocol's exclusion), the pipeline featurizer
computes their features from ``features.safetensors``, and the int8 ONNX ranker scores them.
Users the bundle does not know but who send recent items get the vector the bundle's two-tower
user tower gives that history (no user id, no user features; see
:mod:`slimrank.serving.history_encoder`), or the mean of those items' vectors for bundles
without the tower, and their features are computed with those items as their history (zero
side features); users with neither are served by popularity. The file layout is in
:mod:`slimrank.pipeline.publish`.

The ``retrieval_score`` feature is the score the index gives, as in the pipeline's candidate
mining: with a refine stage that is the inner product with the refine codes' decoded vectors
(SQ8), not with the exact item vectors. On MovieLens-100k (IVF-PQ + SQ8 refine) the exact
product moved that feature by up to 2e-3 and reordered the top 10 of 12 of 943 users.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import faiss
import numpy as np

from slimrank.bundle import Bundle, BundleError
from slimrank.bundle.formats import read_npy
from slimrank.serving.history_encoder import load_history_encoder
from slimrank.serving.loader import bundle_metadata, serving_spec
from slimrank.serving.snapshot import ModelSnapshot

log = logging.getLogger(__name__)

PIPELINE = "pipeline"
SUPPORTED_FORMAT = 1
INDEX_FILES = ("index.faiss", "item_ids.npy", "index.json")
RETRIEVAL_SCORE = "retrieval_score"
# Where bundles keep the two-tower model when serving.json does not say (published before it did).
TOWER_DIRECTORY = "two_tower"

# A featurizer (user row or history rows, (d,) user vector, (m,) candidate rows) -> (m, F).
FeaturizerT = TypeVar("FeaturizerT", bound=Callable[[Any, np.ndarray, np.ndarray], np.ndarray])


def _section(spec: dict[str, Any], name: str, version: str) -> dict[str, Any]:
    value = spec.get(name)
    if not isinstance(value, dict):
        raise BundleError(f"bundle {version}: serving.json[{name!r}] must be an object")
    return value


def _ids(bundle: Bundle, name: str) -> np.ndarray:
    ids = read_npy(bundle.file(name))
    if ids.ndim != 1 or ids.dtype.kind != "U":
        raise BundleError(f"bundle {bundle.version}: {name} must be a 1-d unicode array")
    return ids


def scored_vectors(index: faiss.Index, item_vectors: np.ndarray) -> np.ndarray:
    """Return the ``(I, d)`` float32 vectors whose inner products are the index's own scores.

    A refine stage scores with its decoded codes and a flat index with the vectors it holds;
    other indexes (PQ codes without refine) score approximately per query, and the exact item
    vectors are the closest stand-in.
    """
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        refine = faiss.downcast_index(index.refine_index)
        return np.ascontiguousarray(refine.reconstruct_n(0, refine.ntotal), dtype=np.float32)
    if isinstance(index, faiss.IndexFlat):
        return np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)
    log.warning(
        "%s: no refine stage; retrieval_score is the exact inner product, not the index's",
        type(index).__name__,
    )
    return np.ascontiguousarray(item_vectors, dtype=np.float32)


def with_index_scores(featurize: FeaturizerT, column: int, vectors: np.ndarray) -> FeaturizerT:
    """Return ``featurize`` with feature ``column`` set to ``vectors[item] . user vector``."""

    def wrapped(user: Any, vector: np.ndarray, items: np.ndarray) -> np.ndarray:
        features = featurize(user, vector, items)  # (m, F)
        items = np.asarray(items, dtype=np.int64)
        safe = np.where(items >= 0, items, 0)
        query = np.asarray(vector, dtype=np.float32).reshape(-1)  # (d,)
        features[:, column] = np.where(items >= 0, vectors[safe] @ query, 0.0)
        return features

    return wrapped  # type: ignore[return-value]


def load_pipeline_bundle(bundle: Bundle) -> ModelSnapshot:
    """Return the snapshot of a verified ``pipeline`` bundle; ``BundleError`` if it cannot serve."""
    from slimrank.compression.scorer import Scorer, ScorerConfig
    from slimrank.pipeline.artifacts import load_serving_tables
    from slimrank.pipeline.serving_features import featurizer, history_featurizer
    from slimrank.retrieval.index_io import load_index

    version = bundle.version
    spec = serving_spec(bundle)
    if spec.get("kind") != PIPELINE or spec.get("format") != SUPPORTED_FORMAT:
        raise BundleError(
            f"bundle {version}: serving.json kind {spec.get('kind')!r} format "
            f"{spec.get('format')!r}; this server reads {PIPELINE!r} format {SUPPORTED_FORMAT}"
        )
    ranker, index_spec = _section(spec, "ranker", version), _section(spec, "index", version)
    users, items = _section(spec, "users", version), _section(spec, "items", version)
    layout = _section(spec, "features", version)
    n_candidates = spec.get("candidates")
    if not isinstance(n_candidates, int) or n_candidates < 1:
        raise BundleError(f"bundle {version}: candidates {n_candidates!r} must be an int >= 1")
    try:
        ranker_file = str(ranker["file"])
        index_dir = str(index_spec["directory"])
        for name in INDEX_FILES:
            bundle.file(f"{index_dir}/{name}")  # KeyError unless the manifest verified it
        item_ids, user_ids = _ids(bundle, items["ids"]), _ids(bundle, users["ids"])
        item_vectors = read_npy(bundle.file(items["vectors"])).astype(np.float32, copy=False)
        user_vectors = read_npy(bundle.file(users["vectors"])).astype(np.float32, copy=False)
        popularity = read_npy(bundle.file(str(spec["popularity"]))).astype(np.float32)
        tables = load_serving_tables(
            bundle.file(layout["file"]), layout, user_vectors, item_vectors
        )
        scorer = Scorer(
            bundle.file(ranker_file), bundle.manifest.files[ranker_file].sha256, ScorerConfig()
        )
        index = load_index(bundle.path / index_dir)
        encoder = load_history_encoder(bundle, str(users.get("tower", TOWER_DIRECTORY)))
    except KeyError as err:
        raise BundleError(f"bundle {version}: missing {err}") from err
    if index.ntotal != len(item_ids) or not np.array_equal(
        index.item_ids, np.arange(len(item_ids))
    ):
        raise BundleError(
            f"bundle {version}: the index's {index.ntotal} ids are not the rows of "
            f"{len(item_ids)} items"
        )
    if tables.history.shape != (len(user_ids), len(item_ids)):
        raise BundleError(
            f"bundle {version}: history table {tables.history.shape} does not match "
            f"{len(user_ids)} users x {len(item_ids)} items"
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
    featurize, featurize_history = featurizer(tables), history_featurizer(tables)
    names = list(tables.feature_names)
    if RETRIEVAL_SCORE in names:
        vectors = scored_vectors(index.faiss_index, item_vectors)
        if vectors.shape != item_vectors.shape:
            raise BundleError(
                f"bundle {version}: the index scores {vectors.shape} vectors, the items are "
                f"{item_vectors.shape}"
            )
        column = names.index(RETRIEVAL_SCORE)
        featurize = with_index_scores(featurize, column, vectors)
        featurize_history = with_index_scores(featurize_history, column, vectors)
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
            item_vectors=np.ascontiguousarray(item_vectors),
            user_ids=user_ids,
            user_vectors=np.ascontiguousarray(user_vectors),
            popularity=popularity,
            retrieve=index.search,
            featurize=featurize,
            score=scorer.score,
            metadata=bundle_metadata(bundle),
            seen=tables.history,
            n_candidates=n_candidates,
            encode_history=encoder,
            featurize_history=featurize_history,
        )
    except ValueError as err:
        raise BundleError(f"bundle {version}: {err}") from err
