"""Search-time parameters (nprobe, refine k_factor) tuned to a recall target against exact search.

The core is FAISS's own auto-tuner: ``ParameterSpace.explore`` measures recall and time over a
grid of settings and keeps the Pareto-optimal ``OperatingPoints``; we take the fastest point
that reaches the target and check its recall again with a deterministic search.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator

import faiss
import numpy as np

from slimrank.config import Config, require

log = logging.getLogger(__name__)

_POW2 = tuple(2**i for i in range(13))  # 1 .. 4096


@dataclasses.dataclass(frozen=True)
class TuningConfig(Config):
    """How search parameters are tuned: recall@``recall_k`` >= ``target`` on held-out queries."""

    enabled: bool = True
    recall_k: int = 100
    target: float = 0.95
    n_queries: int = 1_000
    nprobe: tuple[int, ...] = _POW2
    k_factor: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.recall_k >= 1, self, "recall_k", self.recall_k, "must be >= 1")
        require(0 < self.target <= 1, self, "target", self.target, "must be in (0, 1]")
        require(self.n_queries >= 1, self, "n_queries", self.n_queries, "must be >= 1")
        for name in ("nprobe", "k_factor"):
            values = getattr(self, name)
            require(
                len(values) > 0 and all(int(v) == v and v >= 1 for v in values),
                self,
                name,
                values,
                "must be a non-empty tuple of integers >= 1",
            )
            require(list(values) == sorted(set(values)), self, name, values, "must be increasing")


@dataclasses.dataclass(frozen=True)
class TuningResult:
    """The chosen operating point and how it did on the tuning queries."""

    params: dict[str, float]
    recall: float
    met_target: bool
    ms_per_query: float  # as timed by explore, all threads, whole batch / n_queries
    n_queries: int

    def to_dict(self) -> dict[str, object]:
        """Return plain JSON-able values."""
        return dataclasses.asdict(self)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Return mean |found[:, :k] ∩ truth[:, :k]| / k; ``-1`` entries never count.

    ``found`` is (Q, >=k) and ``truth`` (Q, >=k) item indices.
    """
    if found.shape[0] != truth.shape[0] or found.shape[1] < k or truth.shape[1] < k:
        raise ValueError(f"recall_at_k: shapes {found.shape} and {truth.shape} vs k={k}")
    hits = 0
    for f, t in zip(found[:, :k], truth[:, :k], strict=True):
        hits += np.intersect1d(f[f >= 0], t[t >= 0], assume_unique=True).size
    return hits / (k * found.shape[0])


def exact_knn(
    queries: np.ndarray,
    chunks: Iterable[np.ndarray],
    k: int,
    metric: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Return exact ``(distances, indices)``, each (Q, k), over database chunks given in order.

    ``metric`` is a FAISS metric; distances are FAISS's (inner products, or squared L2).
    """
    from faiss.contrib.exhaustive_search import knn_ground_truth

    xq = np.ascontiguousarray(queries, dtype=np.float32)
    return knn_ground_truth(xq, _as_float32(chunks), k, metric_type=metric, ngpu=0)


def _as_float32(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for chunk in chunks:
        yield np.ascontiguousarray(chunk, dtype=np.float32)


def search_params_of(index: faiss.Index) -> tuple[str, ...]:
    """Return the names of the tunable parameters this tuner handles for ``index``."""
    names = []
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        names.append("k_factor_rf")
        index = faiss.downcast_index(index.base_index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexIVF):
        names.append("nprobe")
    return tuple(names)


def nlist_of(index: faiss.Index) -> int:
    """Return the number of IVF lists in ``index``, or 0 if it has none."""
    ivf = faiss.try_extract_index_ivf(index)
    return 0 if ivf is None else int(ivf.nlist)


def apply_params(index: faiss.Index, params: dict[str, float]) -> None:
    """Set search-time parameters on ``index`` (in place); an empty dict is a no-op."""
    if params:
        faiss.ParameterSpace().set_index_parameters(index, _key(params))


def _key(params: dict[str, float]) -> str:
    return ",".join(f"{name}={value:g}" for name, value in params.items())


def _parse_key(key: str) -> dict[str, float]:
    params: dict[str, float] = {}
    for part in key.split(","):
        name, value = part.split("=")
        params[name] = float(value)
    return params


def tune(
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, config: TuningConfig
) -> TuningResult:
    """Return the fastest setting whose recall@``recall_k`` against ``truth`` reaches the target.

    ``queries`` is (Q, d) float32; ``truth`` is (Q, >=recall_k) exact item indices. When no
    setting reaches the target the most accurate one is returned with ``met_target=False``.
    Leaves ``index`` set to the chosen parameters.
    """
    k = config.recall_k
    require(
        truth.shape[0] == queries.shape[0] and truth.shape[1] >= k,
        config,
        "recall_k",
        k,
        f"needs exact results of shape ({queries.shape[0]}, >={k}), got {truth.shape}",
    )
    names = search_params_of(index)
    xq = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, d)
    gt = np.ascontiguousarray(truth[:, :k], dtype=np.int64)  # (Q, k)
    if not names:
        _, found = index.search(xq, k)
        recall = recall_at_k(found, gt, k)
        return TuningResult({}, recall, recall >= config.target, float("nan"), len(xq))

    space = faiss.ParameterSpace()
    space.verbose = 0
    nlist = nlist_of(index)
    for name in names:
        values = config.k_factor if name == "k_factor_rf" else config.nprobe
        if name == "nprobe":
            values = tuple(v for v in values if v <= nlist) or (nlist,)
        param_range = space.add_range(name)
        for v in values:
            param_range.values.push_back(float(v))
    crit = faiss.IntersectionCriterion(len(xq), k)
    crit.set_groundtruth(None, gt)
    ops = space.explore(index, xq, crit)

    points = [ops.optimal_pts.at(i) for i in range(ops.optimal_pts.size())]
    points = [p for p in points if p.cno >= 0]  # drop the (0, 0) sentinel
    points.sort(key=lambda p: p.t)
    if not points:
        raise RuntimeError("ParameterSpace.explore returned no operating points")
    for p in points:
        if p.perf >= config.target:
            params = _parse_key(p.key)
            apply_params(index, params)
            _, found = index.search(xq, k)
            recall = recall_at_k(found, gt, k)
            if recall >= config.target:
                return TuningResult(params, recall, True, 1e3 * p.t / len(xq), len(xq))
    best = max(points, key=lambda p: p.perf)
    params = _parse_key(best.key)
    apply_params(index, params)
    _, found = index.search(xq, k)
    recall = recall_at_k(found, gt, k)
    log.warning(
        "no search setting reaches recall@%d >= %.3f; using the most accurate, %s (recall %.4f)",
        k,
        config.target,
        best.key,
        recall,
    )
    return TuningResult(params, recall, False, 1e3 * best.t / len(xq), len(xq))
