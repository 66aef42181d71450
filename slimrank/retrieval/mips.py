"""The MIPS-to-L2 transform: maximum inner product search as nearest-neighbour search.

Items ``x`` (N, d) become ``[x, sqrt(M^2 - |x|^2)]`` (N, d + 1), ``M`` the largest item norm,
so that every item has norm ``M``; queries ``q`` become ``[q, 0]``. Then
``|q' - x'|^2 = |q|^2 + M^2 - 2 q.x``: the L2-nearest items are exactly those of largest inner
product, and the inner product is recovered from the distance as ``(M^2 + |q|^2 - dist) / 2``
(Bachrach et al., "Speeding up the Xbox recommender system using a euclidean transformation
for inner-product spaces", RecSys 2014).

Why: an IVF index over inner product assigns items to lists by L2 k-means but probes lists by
inner product with their centroids. When item norms vary widely (a two-tower's item-bias
column and popular items make a few vectors 100x longer than the median), the items with the
largest inner products sit in lists whose centroids do not point at the query, and recall
needs a large fraction of the lists probed. After the transform the lists and the probe use
the same metric.

Pure numpy functions: the offline index build and the server's search both import them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MIPS_L2 = "mips_l2"
TRANSFORMS = ("none", MIPS_L2)


def max_norm(items: np.ndarray, chunk: int = 262_144) -> float:
    """Return the largest L2 norm of the rows of ``items`` (N, d), chunk by chunk."""
    top = 0.0
    for start in range(0, items.shape[0], chunk):
        block = np.asarray(items[start : start + chunk], dtype=np.float64)  # (B, d)
        top = max(top, float(np.sqrt(np.einsum("ij,ij->i", block, block).max(initial=0.0))))
    return top


def augment_items(items: np.ndarray, norm: float) -> np.ndarray:
    """Return ``[x, sqrt(norm^2 - |x|^2)]`` (N, d + 1) float32 for items (N, d).

    ``norm`` must be at least every row's norm (:func:`max_norm`); rounding that makes
    ``norm^2 - |x|^2`` slightly negative is clipped to 0.
    """
    x = np.asarray(items, dtype=np.float32)  # (N, d)
    sq = np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64))  # (N,)
    if sq.size and float(sq.max()) > norm * norm * (1 + 1e-5):
        raise ValueError(
            f"an item's norm {math.sqrt(float(sq.max())):.6g} exceeds the transform's "
            f"max_norm {norm:.6g}"
        )
    extra = np.sqrt(np.maximum(norm * norm - sq, 0.0)).astype(np.float32)  # (N,)
    return np.ascontiguousarray(np.hstack([x, extra[:, None]]), dtype=np.float32)


def augment_queries(queries: np.ndarray) -> np.ndarray:
    """Return ``[q, 0]`` (B, d + 1) float32 for queries (B, d)."""
    q = np.asarray(queries, dtype=np.float32)  # (B, d)
    out = np.zeros((q.shape[0], q.shape[1] + 1), dtype=np.float32)
    out[:, :-1] = q
    return out


def inner_products(queries: np.ndarray, sq_dist: np.ndarray, norm: float) -> np.ndarray:
    """Return the inner products (B, k) float32 recovered from squared L2 distances (B, k)
    between augmented queries (B, d) (the un-augmented ones) and augmented items."""
    q = np.asarray(queries, dtype=np.float64)  # (B, d)
    q_sq = np.einsum("ij,ij->i", q, q)[:, None]  # (B, 1)
    return ((norm * norm + q_sq - np.asarray(sq_dist, np.float64)) / 2).astype(np.float32)


def transform_record(norm: float) -> dict[str, Any]:
    """Return the JSON record of the transform (``index.json`` and ``serving.json``)."""
    return {"kind": MIPS_L2, "max_norm": float(norm)}


def parse_transform(record: Any, where: str) -> float | None:
    """Return ``max_norm`` of a transform record, or None for no record / kind ``"none"``.

    Raises ``ValueError`` naming ``where`` and the bad field.
    """
    if record is None:
        return None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object {{'kind': ..., 'max_norm': ...}}")
    kind = record.get("kind")
    if kind not in TRANSFORMS:
        raise ValueError(f"{where}['kind'] = {kind!r}: expected one of {TRANSFORMS}")
    if kind == "none":
        return None
    norm = record.get("max_norm")
    if (
        isinstance(norm, bool)
        or not isinstance(norm, int | float)
        or not math.isfinite(norm)
        or norm <= 0
    ):
        raise ValueError(f"{where}['max_norm'] = {norm!r}: expected a finite number > 0")
    unknown = set(record) - {"kind", "max_norm"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    return float(norm)
