"""Seeded synthetic catalogs for scale work: clustered item vectors and matching query vectors.

Items are drawn from an anisotropic Gaussian mixture around unit-norm centroids, with skewed
(Zipf-like) cluster sizes; queries are drawn near the same centroids. Rows are generated in
fixed blocks of :data:`BLOCK_ROWS`, each with its own seed derived from ``(seed, stream,
block)``, so the same seed gives the same rows whatever chunk size the caller asks for (and a
smaller ``n_items`` gives a prefix), while memory stays near one chunk plus one block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slimrank.config import Config, require

# Rows per independently seeded block; fixed so that data do not depend on the chunk size.
BLOCK_ROWS = 16_384

_ITEM_STREAM = 1
_QUERY_STREAM = 2
_MIXTURE_STREAM = 0


@dataclasses.dataclass(frozen=True)
class SyntheticConfig(Config):
    """Shape and structure of a synthetic catalog.

    ``cluster_std`` is the mean per-dimension noise scale around a unit-norm centroid;
    ``anisotropy`` is the log-normal spread of that scale across dimensions and clusters;
    ``query_std`` scales query noise relative to ``cluster_std``; ``zipf`` skews cluster sizes.
    """

    n_items: int = 100_000
    dim: int = 64
    n_clusters: int = 1_000
    cluster_std: float = 0.1
    anisotropy: float = 0.5
    query_std: float = 1.5
    zipf: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        require(0 < self.n_items <= 100_000_000, self, "n_items", self.n_items, "must be in 1..1e8")
        require(0 < self.dim <= 4096, self, "dim", self.dim, "must be in 1..4096")
        require(self.n_clusters >= 1, self, "n_clusters", self.n_clusters, "must be >= 1")
        require(self.cluster_std > 0, self, "cluster_std", self.cluster_std, "must be > 0")
        require(self.anisotropy >= 0, self, "anisotropy", self.anisotropy, "must be >= 0")
        require(self.query_std > 0, self, "query_std", self.query_std, "must be > 0")
        require(self.zipf >= 0, self, "zipf", self.zipf, "must be >= 0")
        require(self.seed >= 0, self, "seed", self.seed, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class Mixture:
    """The cluster model shared by items and queries."""

    centroids: np.ndarray  # (C, d) float32, unit rows
    scales: np.ndarray  # (C, d) float32, per-cluster per-dimension noise std
    weights: np.ndarray  # (C,) float64, sums to 1


def make_mixture(config: SyntheticConfig) -> Mixture:
    """Return the seeded Gaussian mixture that items and queries are drawn from."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _MIXTURE_STREAM]))
    c, d = config.n_clusters, config.dim
    centroids = rng.standard_normal((c, d))  # (C, d)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    log_scale = rng.standard_normal((c, d)) * config.anisotropy  # (C, d)
    scales = config.cluster_std * np.exp(log_scale - config.anisotropy**2 / 2)
    weights = 1.0 / np.arange(1, c + 1) ** config.zipf  # (C,)
    weights = rng.permutation(weights / weights.sum())
    return Mixture(centroids.astype(np.float32), scales.astype(np.float32), weights)


def _block(mixture: Mixture, seed: int, stream: int, block: int, rows: int, noise: float):
    """Return ``rows`` vectors of one seeded block, (rows, d) float32."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream, block]))
    cluster = rng.choice(len(mixture.weights), size=rows, p=mixture.weights)  # (rows,)
    eps = rng.standard_normal((rows, mixture.centroids.shape[1]), dtype=np.float32)  # (rows, d)
    eps *= mixture.scales[cluster] * np.float32(noise)
    eps += mixture.centroids[cluster]
    return eps


def _iter_rows(
    config: SyntheticConfig, stream: int, n: int, noise: float, chunk_rows: int
) -> Iterator[tuple[int, np.ndarray]]:
    require(chunk_rows >= 1, "chunk_rows", "chunk_rows", chunk_rows, "must be >= 1")
    mixture = make_mixture(config)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        first, last = start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS
        parts = []
        for b in range(first, last + 1):
            # Whole blocks are drawn even at the end, so a smaller n gives a prefix.
            block = _block(mixture, config.seed, stream, b, BLOCK_ROWS, noise)
            lo = max(start - b * BLOCK_ROWS, 0)
            hi = min(stop - b * BLOCK_ROWS, BLOCK_ROWS)
            parts.append(block[lo:hi])
        yield start, np.concatenate(parts) if len(parts) > 1 else parts[0]  # (stop-start, d)


def iter_items(
    config: SyntheticConfig, chunk_rows: int = 65_536
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, items)`` chunks covering all ``n_items`` rows, each (rows, d) float32."""
    return _iter_rows(config, _ITEM_STREAM, config.n_items, 1.0, chunk_rows)


def iter_queries(
    config: SyntheticConfig, n_queries: int, chunk_rows: int = 65_536, stream: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, queries)`` chunks of query vectors drawn near the item clusters.

    Different ``stream`` values give independent query sets (e.g. tuning vs. held-out).
    """
    require(n_queries >= 1, "iter_queries", "n_queries", n_queries, "must be >= 1")
    require(stream >= 0, "iter_queries", "stream", stream, "must be >= 0")
    return _iter_rows(config, _QUERY_STREAM + stream, n_queries, config.query_std, chunk_rows)


def items(config: SyntheticConfig, chunk_rows: int = 65_536) -> np.ndarray:
    """Return all item vectors in memory, (n_items, dim) float32."""
    out = np.empty((config.n_items, config.dim), dtype=np.float32)  # (N, d)
    for start, chunk in iter_items(config, chunk_rows):
        out[start : start + len(chunk)] = chunk
    return out


def queries(config: SyntheticConfig, n_queries: int, stream: int = 0) -> np.ndarray:
    """Return ``n_queries`` query vectors in memory, (n_queries, dim) float32."""
    out = np.empty((n_queries, config.dim), dtype=np.float32)  # (Q, d)
    for start, chunk in iter_queries(config, n_queries, stream=stream):
        out[start : start + len(chunk)] = chunk
    return out


def write_items_npy(
    config: SyntheticConfig, path: str | Path, chunk_rows: int = 65_536
) -> np.ndarray:
    """Write all item vectors to a ``.npy`` file chunk by chunk; returns it memory-mapped (read)."""
    path = Path(path)
    out = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float32, shape=(config.n_items, config.dim)
    )  # (N, d)
    for start, chunk in iter_items(config, chunk_rows):
        out[start : start + len(chunk)] = chunk
    out.flush()
    del out
    return np.load(path, mmap_mode="r")
