"""Paired comparisons of two systems over the same users: per-user metrics and a bootstrap CI.

Two systems evaluated on one split have a metric per test user each. Their difference is
measured on the same users, so the interval resamples users (with replacement) and recomputes
the mean of the per-user differences: the paired bootstrap (Efron and Tibshirani, 1993, ch. 13;
Sakai, 2006, for IR metrics). The resampling is :func:`scipy.stats.bootstrap` (percentile
interval), applied to the one-sample differences, which is what pairing means.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.stats import bootstrap


@dataclasses.dataclass(frozen=True)
class PerUser:
    """One metric per evaluated user: ``users`` (ascending indices) and their ``values``."""

    users: np.ndarray  # (U,) int64
    values: np.ndarray  # (U,) float64

    def __post_init__(self) -> None:
        users, values = np.asarray(self.users), np.asarray(self.values)
        if users.ndim != 1 or users.shape != values.shape:
            raise ValueError(f"users {users.shape} and values {values.shape} must be equal 1-D")
        if len(users) > 1 and not (np.diff(users) > 0).all():
            raise ValueError("users must be strictly ascending")

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if len(self.values) else float("nan")


@dataclasses.dataclass(frozen=True)
class PairedInterval:
    """Mean of ``a - b`` over the shared users and its bootstrap interval."""

    diff: float
    low: float
    high: float
    level: float
    users: int
    resamples: int

    @property
    def above_zero(self) -> bool:
        return self.low > 0.0

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def paired_bootstrap(
    a: PerUser,
    b: PerUser,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedInterval:
    """Return the mean per-user difference ``a - b`` and its paired bootstrap interval.

    ``a`` and ``b`` must hold the same users (one system's user missing from the other is
    an error, not a silent drop). The interval is the percentile interval of the mean
    difference over ``resamples`` resamplings of users with replacement.
    """
    if not np.array_equal(a.users, b.users):
        raise ValueError(
            f"paired comparison needs the same users: {len(a.users)} vs {len(b.users)} users, "
            f"{len(np.setxor1d(a.users, b.users))} not in both"
        )
    if len(a.users) < 2:
        raise ValueError(f"paired bootstrap needs at least 2 users, got {len(a.users)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: must be in (0, 1)")
    diff = np.asarray(a.values, dtype=np.float64) - np.asarray(b.values, dtype=np.float64)
    mean = float(diff.mean())
    if np.all(diff == diff[0]):  # every resample has this mean; scipy would warn
        low = high = mean
    else:
        res = bootstrap(
            (diff,),
            np.mean,
            n_resamples=resamples,
            confidence_level=level,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return PairedInterval(mean, low, high, level, len(diff), resamples)
