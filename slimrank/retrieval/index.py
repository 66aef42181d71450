"""The FAISS retrieval index: a config, a plan sized from the catalog, a builder, a search object.

``plan_index`` (pure) turns an :class:`IndexConfig` and the catalog size into a FAISS
``index_factory`` string, shrinking settings the catalog cannot train (fewer lists, fewer PQ
bits, or exact search) and saying why. ``build_index`` trains on a seeded sample, adds in
chunks, tunes nprobe / refine k_factor to a recall target and returns a :class:`RetrievalIndex`.
With ``transform = "mips_l2"`` an inner-product index is built over the MIPS-to-L2 transform
of the items (:mod:`slimrank.retrieval.mips`) and searched by L2; ``RetrievalIndex.search``
still takes d-dim queries and returns inner products. Saving and loading live in
:mod:`slimrank.retrieval.index_io`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np

from slimrank.config import Config, require
from slimrank.errors import DataError
from slimrank.retrieval.mips import (
    MIPS_L2,
    TRANSFORMS,
    augment_items,
    augment_queries,
    inner_products,
    max_norm,
    transform_record,
)
from slimrank.retrieval.tuning import (
    TuningConfig,
    TuningResult,
    apply_params,
    exact_knn,
    recall_at_k,
    tune,
)

log = logging.getLogger(__name__)

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
KINDS = ("ivfpq", "ivfflat", "flat")
REFINES = ("none", "sq8", "flat")

# k-means wants at least this many training points per centroid (FAISS warns below it).
MIN_POINTS_PER_CENTROID = 39
_CHECK_ROWS = 262_144


@dataclasses.dataclass(frozen=True)
class IndexConfig(Config):
    """What index to build and how; ``nlist=0`` sizes the IVF from the catalog.

    The default is IVF (about 4*sqrt(N) lists) + 4-bit FastScan PQ with 32 sub-quantizers,
    re-ranked with SQ8 codes: 16 + 64 bytes of codes + 8 bytes of id per vector at d=64.
    ``kind = "ivfflat"`` keeps the vectors uncompressed in the IVF lists (4 bytes per dim;
    the PQ, OPQ and refine fields do not apply); ``"flat"`` is exact search.
    ``transform = "mips_l2"`` (inner product only) indexes the items after the MIPS-to-L2
    transform (one more dimension) and searches by L2: the IVF lists and the probe then use
    the same metric, which matters when item norms vary widely.
    """

    kind: str = "ivfpq"
    metric: str = "ip"
    transform: str = "none"
    nlist: int = 0
    lists_per_sqrt_n: float = 4.0
    pq_m: int = 32
    pq_bits: int = 4
    fastscan: bool = True
    opq: bool = False
    refine: str = "sq8"
    train_points_per_list: int = 64
    flat_below: int = 1_000
    add_chunk: int = 65_536
    threads: int = 1
    seed: int = 0
    tuning: TuningConfig = dataclasses.field(default_factory=TuningConfig)

    def __post_init__(self) -> None:
        require(self.kind in KINDS, self, "kind", self.kind, f"must be one of {KINDS}")
        require(self.metric in METRICS, self, "metric", self.metric, f"one of {tuple(METRICS)}")
        require(
            self.transform in TRANSFORMS,
            self,
            "transform",
            self.transform,
            f"must be one of {TRANSFORMS}",
        )
        require(
            self.transform == "none" or self.metric == "ip",
            self,
            "transform",
            self.transform,
            'the MIPS-to-L2 transform is for metric = "ip"',
        )
        require(self.nlist >= 0, self, "nlist", self.nlist, "must be >= 0 (0 = auto)")
        require(
            1 <= self.lists_per_sqrt_n <= 64,
            self,
            "lists_per_sqrt_n",
            self.lists_per_sqrt_n,
            "must be in [1, 64] (about 4 to 16 is usual)",
        )
        require(self.pq_m >= 1, self, "pq_m", self.pq_m, "must be >= 1")
        require(1 <= self.pq_bits <= 16, self, "pq_bits", self.pq_bits, "must be in 1..16")
        require(
            not self.fastscan or self.pq_bits == 4,
            self,
            "pq_bits",
            self.pq_bits,
            "FastScan (fastscan=True) needs 4-bit PQ codes",
        )
        require(self.refine in REFINES, self, "refine", self.refine, f"must be one of {REFINES}")
        require(
            self.train_points_per_list >= MIN_POINTS_PER_CENTROID,
            self,
            "train_points_per_list",
            self.train_points_per_list,
            f"k-means needs >= {MIN_POINTS_PER_CENTROID} points per list",
        )
        require(self.flat_below >= 0, self, "flat_below", self.flat_below, "must be >= 0")
        require(self.add_chunk >= 1, self, "add_chunk", self.add_chunk, "must be >= 1")
        require(self.threads >= 1, self, "threads", self.threads, "must be >= 1")
        require(self.seed >= 0, self, "seed", self.seed, "must be >= 0")

    @property
    def faiss_metric(self) -> int:
        """The FAISS metric constant."""
        return METRICS[self.metric]


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """The concrete index chosen for one catalog; ``notes`` say what was changed and why.

    ``transform`` is the MIPS-to-L2 transform's name when the index is built over it (the
    FAISS index then holds ``d + 1`` dims, L2), else ``"none"``.
    """

    factory_string: str
    nlist: int
    pq_bits: int
    train_size: int
    notes: tuple[str, ...]
    transform: str = "none"


def _pow2_floor(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(x, 1.0))))


def _pow2_round(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def plan_index(config: IndexConfig, n: int, d: int) -> IndexPlan:
    """Return the index to build for ``n`` vectors of ``d`` dims, shrunk to what ``n`` can train.

    Raises ``ValueError`` (naming the field) when a field cannot fit ``d`` at all.
    """
    if n < 1:
        raise DataError("cannot build an index over an empty catalog (0 items)")
    notes: list[str] = []
    exact = "" if config.transform == "none" else "; exact search needs no MIPS-to-L2 transform"
    if config.kind == "flat":
        return IndexPlan("Flat", 0, 0, 0, (exact[2:],) if exact else ())
    if n < config.flat_below:
        notes.append(f"{n} items < flat_below={config.flat_below}: exact search (Flat){exact}")
        return IndexPlan("Flat", 0, 0, 0, tuple(notes))
    nlist = config.nlist or _pow2_round(config.lists_per_sqrt_n * math.sqrt(n))
    max_lists = n // MIN_POINTS_PER_CENTROID
    if nlist > max_lists:
        smaller = _pow2_floor(max_lists)
        notes.append(
            f"nlist {nlist} needs {MIN_POINTS_PER_CENTROID * nlist} training points "
            f"but the catalog has {n}: using {smaller} lists"
        )
        nlist = smaller

    if config.kind == "ivfflat":
        train_size = min(n, config.train_points_per_list * nlist)
        factory = f"IVF{nlist},Flat"
        return IndexPlan(factory, nlist, 0, train_size, tuple(notes), config.transform)

    require(config.pq_m <= d, config, "pq_m", config.pq_m, f"must be <= the vector dimension {d}")
    if config.transform == MIPS_L2:
        d += 1  # the transform's extra coordinate
    padded = -(-d // config.pq_m) * config.pq_m  # the next multiple of pq_m
    if padded != d:
        # Zero dimensions change no inner product or distance; PQ needs d divisible by m.
        notes.append(
            f"pq_m={config.pq_m} does not divide d={d}: zero-padding the vectors to {padded} "
            f"dims (Pad{padded})"
        )

    bits = config.pq_bits
    if n < MIN_POINTS_PER_CENTROID * 2**bits:
        # FastScan needs 4-bit codes; plain PQ can drop bits down to 4.
        smaller_bits = math.floor(math.log2(n / MIN_POINTS_PER_CENTROID))
        if config.fastscan or smaller_bits < 4:
            notes.append(
                f"{bits}-bit PQ needs {MIN_POINTS_PER_CENTROID * 2**bits} training points, "
                f"the catalog has {n}: exact search (Flat){exact}"
            )
            return IndexPlan("Flat", 0, 0, 0, tuple(notes))
        notes.append(
            f"{bits}-bit PQ needs {MIN_POINTS_PER_CENTROID * 2**bits} training points, "
            f"the catalog has {n}: using {smaller_bits}-bit codes"
        )
        bits = smaller_bits

    train_size = min(n, max(config.train_points_per_list * nlist, 256 * 2**bits))
    parts = [f"Pad{padded}"] if padded != d else []
    if config.opq:
        parts.append(f"OPQ{config.pq_m}")
    parts.append(f"IVF{nlist}")
    # "np": no polysemous training, which takes minutes and only serves Hamming-filtered search.
    parts.append(f"PQ{config.pq_m}x{bits}" + ("fs" if config.fastscan else "np"))
    if config.refine == "sq8":
        parts.append("Refine(SQ8)")
    elif config.refine == "flat":
        parts.append("RFlat")
    return IndexPlan(",".join(parts), nlist, bits, train_size, tuple(notes), config.transform)


def check_vectors(vectors: Any, name: str, d: int | None = None) -> np.ndarray:
    """Return ``vectors`` as a 2-D array after checking shape, dimension and finiteness.

    Raises :class:`DataError` naming the first bad row. Works chunk by chunk, so a
    memory-mapped ``.npy`` is never loaded whole.
    """
    arr = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
    if arr.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array (n, d), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{name}: empty (0 rows)")
    if d is not None and arr.shape[1] != d:
        raise DataError(f"{name}: vectors have {arr.shape[1]} dims, the index has {d}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{name}: expected numeric vectors, got dtype {arr.dtype}")
    for start in range(0, arr.shape[0], _CHECK_ROWS):
        chunk = arr[start : start + _CHECK_ROWS]
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            row = start + int(np.argmax(bad))
            raise DataError(f"{name}: NaN or Inf in vector", row=row)
    return arr


_omp = threading.local()


def omp_threads(n: int) -> None:
    """Make FAISS use ``n`` OpenMP threads in the calling thread.

    OpenMP's thread count is per thread: one set while loading does not hold in the event
    loop or a handler thread, which start at the number of cores. There every one-query
    search forked a team of that size (on the ml-100k bundle 0.08 instead of 0.06 ms of CPU
    per search, the idle member spinning on the other core).
    """
    if getattr(_omp, "n", None) != n:
        faiss.omp_set_num_threads(n)
        _omp.n = n


def _chunks(vectors: np.ndarray, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, vectors.shape[0], rows):
        yield start, np.ascontiguousarray(vectors[start : start + rows], dtype=np.float32)


class RetrievalIndex:
    """A FAISS index with its item id map and tuned search parameters.

    ``search`` returns scores where higher is better (inner product, or minus squared L2)
    and dense item indices; ``item_ids[item_idx]`` maps them to catalog ids. Missing results
    (fewer than k items reachable) are index -1 with score -inf. Searches with
    ``config.threads`` OpenMP threads from whichever thread calls :meth:`search`.

    ``mips_norm`` set: the FAISS index holds the items after the MIPS-to-L2 transform with
    that ``max_norm`` (``d + 1`` dims, L2); ``search`` augments the d-dim queries and returns
    the inner products recovered from the distances.
    """

    def __init__(
        self,
        index: faiss.Index,
        item_ids: np.ndarray,
        config: IndexConfig,
        factory_string: str,
        params: dict[str, float],
        tuning: TuningResult | None = None,
        mips_norm: float | None = None,
    ) -> None:
        if item_ids.shape != (index.ntotal,):
            raise DataError(
                f"item id map has shape {item_ids.shape}, the index holds {index.ntotal} vectors"
            )
        if mips_norm is not None and (index.metric_type != faiss.METRIC_L2 or index.d < 2):
            raise DataError("a MIPS-to-L2 transformed index must be an L2 index of >= 2 dims")
        self._index = index
        self.mips_norm = mips_norm
        self.item_ids = item_ids
        self.config = config
        self.factory_string = factory_string
        self.params = dict(params)
        self.tuning = tuning
        omp_threads(config.threads)
        apply_params(index, self.params)

    @property
    def ntotal(self) -> int:
        """Number of indexed items."""
        return int(self._index.ntotal)

    @property
    def d(self) -> int:
        """Vector dimension of items and queries (the FAISS index's minus the transform's)."""
        return int(self._index.d) - (self.mips_norm is not None)

    @property
    def transform(self) -> str:
        """``"mips_l2"`` when the index is built over the MIPS-to-L2 transform, else ``"none"``."""
        return "none" if self.mips_norm is None else MIPS_L2

    @property
    def faiss_index(self) -> faiss.Index:
        """The underlying FAISS index (for saving and benchmarks; do not change its parameters)."""
        return self._index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(scores, item_idx)``, each (B, k), for queries (B, d); best first."""
        if k < 1:
            raise ValueError(f"k={k!r}: must be >= 1")
        xq = check_vectors(queries, "queries", self.d)
        xq = np.ascontiguousarray(xq, dtype=np.float32)  # (B, d)
        # Refine re-ranks k * k_factor candidates, so the tuned recall holds only for searches of
        # at least recall_k; smaller k searches at recall_k and keeps the top k.
        k_search = max(k, self.config.tuning.recall_k) if "k_factor_rf" in self.params else k
        omp_threads(self.config.threads)
        if self.mips_norm is not None:
            dist, idx = self._index.search(augment_queries(xq), k_search)  # (B, k_search)
            scores = inner_products(xq, dist[:, :k], self.mips_norm)  # (B, k)
            idx = idx[:, :k]
        else:
            scores, idx = self._index.search(xq, k_search)  # (B, k_search)
            scores, idx = scores[:, :k], idx[:, :k]  # (B, k)
            if self.config.metric == "l2":
                scores = -scores
        scores[idx < 0] = -np.inf
        return scores, idx

    def ids(self, item_idx: np.ndarray) -> np.ndarray:
        """Map dense item indices to catalog ids; -1 stays -1."""
        out = np.full(item_idx.shape, -1, dtype=self.item_ids.dtype)
        ok = item_idx >= 0
        out[ok] = self.item_ids[item_idx[ok]]
        return out

    def info(self) -> dict[str, Any]:
        """Return a JSON-able description: factory string, sizes, params, config, tuning."""
        return {
            "factory_string": self.factory_string,
            "metric": self.config.metric,
            "d": self.d,
            "transform": None if self.mips_norm is None else transform_record(self.mips_norm),
            "ntotal": self.ntotal,
            "params": self.params,
            "config": self.config.to_dict(),
            "tuning": None if self.tuning is None else self.tuning.to_dict(),
            "faiss_version": faiss.__version__,
        }


def _check_ids(item_ids: Any, n: int) -> np.ndarray:
    if item_ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(item_ids)
    if ids.shape != (n,):
        raise DataError(f"item_ids: shape {ids.shape}, expected ({n},) to match the vectors")
    if not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"item_ids: expected integers, got dtype {ids.dtype}")
    if np.unique(ids).size != n:
        raise DataError("item_ids: ids are not unique")
    return ids.astype(np.int64)


def build_index(
    vectors: np.ndarray,
    config: IndexConfig | None = None,
    item_ids: np.ndarray | None = None,
    tune_queries: np.ndarray | None = None,
    progress: bool = True,
    coarse_centroids: np.ndarray | None = None,
) -> RetrievalIndex:
    """Train, fill and tune an index over ``vectors`` (N, d); returns a :class:`RetrievalIndex`.

    ``vectors`` may be a memory-mapped ``.npy``. ``tune_queries`` (Q, d) are held-out queries
    for tuning; without them a seeded sample of ``tuning.n_queries`` catalog vectors is used.
    ``coarse_centroids`` (nlist, d), e.g. from :func:`coarse_centroids_of` another index over
    the same catalog, skip the IVF k-means (not with OPQ, whose lists live in rotated space).
    """
    config = config or IndexConfig()
    xb = check_vectors(vectors, "vectors")
    n, d = xb.shape
    ids = _check_ids(item_ids, n)
    omp_threads(config.threads)
    plan = plan_index(config, n, d)
    for note in plan.notes:
        log.info("index plan: %s", note)
    norm = None
    metric = config.faiss_metric
    if plan.transform == MIPS_L2:
        norm = max_norm(xb)
        metric = faiss.METRIC_L2
        log.info("MIPS-to-L2 transform: max item norm %.4g, %d + 1 dims, L2", norm, d)
    log.info("building %s over %d x %d (%s)", plan.factory_string, n, d, config.metric)
    index = faiss.index_factory(d + (norm is not None), plan.factory_string, metric)

    if coarse_centroids is not None:
        _set_coarse_centroids(index, plan, config, coarse_centroids)
    rng = np.random.default_rng(config.seed)
    if not index.is_trained or coarse_centroids is not None:
        sample = np.sort(rng.choice(n, size=plan.train_size, replace=False))
        xt = np.ascontiguousarray(xb[sample], dtype=np.float32)  # (T, d)
        if norm is not None:
            xt = augment_items(xt, norm)  # (T, d + 1)
        log.info("training on %d sampled vectors", len(xt))
        index.train(xt)
        del xt
    _add_in_chunks(index, xb, config.add_chunk, progress, norm)

    built = RetrievalIndex(index, ids, config, plan.factory_string, {}, mips_norm=norm)
    if config.tuning.enabled and plan.factory_string != "Flat":
        return tune_index(built, xb, tune_queries)
    return built


def coarse_centroids_of(index: RetrievalIndex) -> np.ndarray:
    """Return the IVF centroids of ``index``, (nlist, d) float32."""
    ivf = faiss.try_extract_index_ivf(index.faiss_index)
    if ivf is None:
        raise ValueError(f"{index.factory_string!r} has no IVF coarse quantizer")
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)  # (nlist, d)


def _set_coarse_centroids(
    index: faiss.Index, plan: IndexPlan, config: IndexConfig, centroids: np.ndarray
) -> None:
    require(not config.opq, config, "opq", config.opq, "cannot reuse coarse centroids with OPQ")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise ValueError(f"coarse_centroids given, but {plan.factory_string!r} has no IVF")
    if centroids.shape != (plan.nlist, ivf.d):  # ivf.d: after any padding
        raise DataError(
            f"coarse_centroids: shape {centroids.shape}, the plan needs ({plan.nlist}, {ivf.d})"
        )
    # FAISS skips the IVF k-means when the quantizer already holds nlist centroids.
    ivf.quantizer.add(np.ascontiguousarray(check_vectors(centroids, "coarse_centroids"), "f4"))


def _add_in_chunks(
    index: faiss.Index, xb: np.ndarray, rows: int, progress: bool, norm: float | None = None
) -> None:
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("adding vectors", total=xb.shape[0])
        for _, chunk in _chunks(xb, rows):
            index.add(chunk if norm is None else augment_items(chunk, norm))
            bar.advance(task, len(chunk))


def tune_index(
    index: RetrievalIndex,
    vectors: np.ndarray,
    queries: np.ndarray | None = None,
    config: TuningConfig | None = None,
) -> RetrievalIndex:
    """Return ``index`` with search parameters tuned against exact search over ``vectors``.

    ``vectors`` (N, d) are the indexed vectors, in index order. ``queries`` (Q, d) are held-out
    queries; without them a seeded sample of ``n_queries`` catalog vectors is used. The new
    object shares the FAISS index with ``index``, whose parameters it overrides. An index over
    the MIPS-to-L2 transform is tuned against exact inner-product search.
    """
    tc = config or index.config.tuning
    xb = check_vectors(vectors, "vectors", index.d)
    n, d = xb.shape
    if n != index.ntotal:
        raise DataError(f"vectors: {n} rows, the index holds {index.ntotal}")
    if queries is None:
        rng = np.random.default_rng(tc.seed)
        pick = np.sort(rng.choice(n, size=min(n, tc.n_queries), replace=False))
        xq = np.ascontiguousarray(xb[pick], dtype=np.float32)  # (Q, d)
    else:
        xq = np.ascontiguousarray(check_vectors(queries, "tune_queries", d), dtype=np.float32)
    if tc.recall_k > n:
        tc = dataclasses.replace(tc, recall_k=n)
    metric = index.config.faiss_metric
    chunks = (c for _, c in _chunks(xb, index.config.add_chunk))
    _, truth = exact_knn(xq, chunks, tc.recall_k, metric)  # (Q, k)
    searched = xq if index.mips_norm is None else augment_queries(xq)  # (Q, d [+ 1])
    result = tune(index.faiss_index, searched, truth, tc)
    log.info(
        "tuned %s: recall@%d %.4f (target %.3f) on %d queries",
        result.params,
        tc.recall_k,
        result.recall,
        tc.target,
        len(xq),
    )
    config = dataclasses.replace(index.config, tuning=tc)
    return RetrievalIndex(
        index.faiss_index,
        index.item_ids,
        config,
        index.factory_string,
        result.params,
        result,
        mips_norm=index.mips_norm,
    )


def evaluate_recall(index: RetrievalIndex, queries: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Return recall@k of ``index`` against exact indices ``truth`` (Q, >=k)."""
    _, found = index.search(queries, k)
    return recall_at_k(found, truth, k)
