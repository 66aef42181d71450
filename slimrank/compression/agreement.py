"""How often a compressed ranker picks the same top-k as its reference: arrays in, shares out."""

from __future__ import annotations

import numpy as np

from slimrank.config import require


def top_k(scores: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Return each list's ``k`` best candidate indices, best first, ``(U, N) -> (U, k)``.

    Masked-out (``False``) candidates rank last; the sort is stable, so exact ties keep list
    order and two identical score arrays always give identical answers.
    """
    scores = np.asarray(scores, dtype=np.float64)  # (U, N)
    require(scores.ndim == 2, "top_k", "scores", scores.shape, "must be (U, N)")
    require(0 < k <= scores.shape[1], "top_k", "k", k, f"must be in [1, {scores.shape[1]}]")
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def same_top_k(
    reference: np.ndarray,
    candidate: np.ndarray,
    k: int = 10,
    mask: np.ndarray | None = None,
    order: bool = False,
) -> float:
    """Return the share of lists whose top-``k`` by ``candidate`` is the top-``k`` by ``reference``.

    ``reference`` and ``candidate`` are ``(U, N)`` scores of the same candidates; ``mask``
    ``(U, N)`` marks real candidates (pads never count). ``order=False`` compares the top-k as
    sets, ``order=True`` also their order. A list with ``k`` or fewer real candidates agrees
    as a set by definition and is counted.
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    require(
        reference.shape == candidate.shape,
        "same_top_k",
        "candidate",
        candidate.shape,
        f"must have the reference's shape {reference.shape}",
    )
    if len(reference) == 0:
        return float("nan")
    a, b = top_k(reference, k, mask), top_k(candidate, k, mask)  # (U, k) each
    if mask is not None:
        # Beyond a short list's real candidates the "top-k" is pads in arbitrary order.
        real = np.minimum(np.asarray(mask).sum(axis=1), k)  # (U,)
        keep = np.arange(k)[None, :] < real[:, None]  # (U, k)
        a, b = np.where(keep, a, -1), np.where(keep, b, -1)
    if not order:
        a, b = np.sort(a, axis=1), np.sort(b, axis=1)
    return float(np.mean(np.all(a == b, axis=1)))
