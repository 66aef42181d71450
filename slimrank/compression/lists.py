"""Candidate lists as the student trains on them: padded ``(B, N, F)`` features, teacher scores,
labels and a mask, and the standardization of their features.

Students train on standardized features (statistics of the real training candidates) and are
exported with the standardization inside the graph (:class:`~slimrank.compression.export.
Standardized`), so every ONNX ranker takes raw candidate features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from slimrank.config import require

# Lists standardized at a time: bounds the temporaries (256 x 200 candidates x 257
# float64 features are 105 MB).
STANDARDIZE_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class ListData:
    """Candidate lists padded to one length: features ``(B, N, F)``, the rest ``(B, N)``."""

    features: torch.Tensor
    teacher_scores: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        b, n, _ = self.features.shape
        for name in ("teacher_scores", "labels", "mask"):
            shape = tuple(getattr(self, name).shape)
            require(shape == (b, n), self, name, shape, f"must have shape {(b, n)}")
        require(self.mask.dtype == torch.bool, self, "mask", self.mask.dtype, "must be bool")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def subset(self, index: torch.Tensor) -> ListData:
        """Return the lists at ``index``."""
        return ListData(
            self.features[index], self.teacher_scores[index], self.labels[index], self.mask[index]
        )


def pad_lists(
    features: Sequence[np.ndarray],
    teacher_scores: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None = None,
) -> ListData:
    """Return :class:`ListData` from per-user arrays ``(N_u, F)`` and ``(N_u,)``, zero-padded."""
    require(len(features) > 0, "pad_lists", "features", len(features), "needs at least one list")
    require(
        len(teacher_scores) == len(features),
        "pad_lists",
        "teacher_scores",
        len(teacher_scores),
        f"must hold one array per list ({len(features)})",
    )
    if labels is None:
        labels = [np.zeros(len(x), dtype=np.float32) for x in features]
    n = max(len(x) for x in features)
    dim = features[0].shape[1]
    b = len(features)
    feats = np.zeros((b, n, dim), dtype=np.float32)  # (B, N, F)
    teach = np.zeros((b, n), dtype=np.float32)  # (B, N)
    labs = np.zeros((b, n), dtype=np.float32)  # (B, N)
    mask = np.zeros((b, n), dtype=bool)  # (B, N)
    for i, (x, t, y) in enumerate(zip(features, teacher_scores, labels, strict=True)):
        m = len(x)
        require(
            len(t) == m and len(y) == m, "pad_lists", "list", i, "needs one score per candidate"
        )
        feats[i, :m], teach[i, :m], labs[i, :m], mask[i, :m] = x, t, y, True
    return ListData(
        torch.from_numpy(feats),
        torch.from_numpy(teach),
        torch.from_numpy(labs),
        torch.from_numpy(mask),
    )


def standardization(
    values: np.ndarray, mask: np.ndarray, block_lists: int = STANDARDIZE_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``(F,)`` mean and std of the real candidates of ``(U, N, F)`` ``values``.

    A feature constant over the training candidates gets std 1, not a tiny floor: the student
    learns nothing from it, and dividing a later, different value by ~0 would feed the student
    z-scores of 1e5 (seen on the synthetic catalog, where every training user has the same
    history length and validation users a longer one).

    Two passes in float64 over ``block_lists`` lists at a time: a float64 copy of every real
    candidate was twice the features' size (8 GB of the students step's 14.2 GiB at 1M).
    """
    dim = values.shape[-1]
    count = int(np.count_nonzero(mask))
    if count == 0:
        return np.zeros(dim, dtype=np.float32), np.ones(dim, dtype=np.float32)
    step = max(1, block_lists)
    parts = [(values[a : a + step], mask[a : a + step]) for a in range(0, len(values), step)]
    total = np.zeros(dim)
    for block, real in parts:
        total += block[real].sum(axis=0, dtype=np.float64)
    mean = total / count
    squares = np.zeros(dim)
    for block, real in parts:
        centred = block[real] - mean  # (M, F) float64
        squares += np.einsum("mf,mf->f", centred, centred)
    std = np.sqrt(squares / count)
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def standardized(
    values: np.ndarray,
    mask: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    block_lists: int = STANDARDIZE_BLOCK,
) -> np.ndarray:
    """Return ``(values - mean) / std`` as float32, 0 at pads, for ``(U, N, F)`` ``values``.

    Written ``block_lists`` lists at a time into one array: the whole-array expression held
    two more copies of the features at its peak."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    x = np.empty(values.shape, dtype=np.float32)  # (U, N, F)
    step = max(1, block_lists)
    for a in range(0, len(values), step):
        part = x[a : a + step]
        np.subtract(values[a : a + step], mean, out=part)
        part /= std
        part[~mask[a : a + step]] = 0.0
    return x


def standardized_lists(
    values: np.ndarray,
    mask: np.ndarray,
    labels: np.ndarray,
    teacher: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    block_lists: int = STANDARDIZE_BLOCK,
) -> ListData:
    """Return the lists of ``(U, N, F)`` features standardized by ``mean``/``std`` (pads 0)."""
    return ListData(
        torch.from_numpy(standardized(values, mask, mean, std, block_lists)),
        torch.from_numpy(np.where(mask, teacher, 0.0).astype(np.float32)),
        torch.from_numpy(labels.astype(np.float32)),
        torch.from_numpy(mask),
    )
