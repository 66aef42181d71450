"""The paired bootstrap over users against hand-computed cases and the normal approximation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from slimrank.evaluation.paired import PerUser, paired_bootstrap


def test_identical_systems_give_zero_interval() -> None:
    values = np.random.default_rng(0).random(50)
    a = PerUser(np.arange(50), values)
    out = paired_bootstrap(a, PerUser(np.arange(50), values.copy()))
    assert (out.diff, out.low, out.high) == (0.0, 0.0, 0.0)
    assert not out.above_zero


def test_constant_gain_is_the_interval() -> None:
    base = np.random.default_rng(1).random(40)
    out = paired_bootstrap(PerUser(np.arange(40), base + 0.25), PerUser(np.arange(40), base))
    assert out.diff == pytest.approx(0.25)
    assert out.low == pytest.approx(0.25) and out.high == pytest.approx(0.25)
    assert out.above_zero


def test_interval_matches_the_normal_approximation_of_the_mean() -> None:
    # 2,000 users, differences ~ N(0.01, 0.1): the mean's 95% interval is 0.01 +- 1.96 sd/sqrt(n).
    rng = np.random.default_rng(2)
    b = rng.random(2000)
    diff = rng.normal(0.01, 0.1, 2000)
    users = np.arange(0, 4000, 2)
    out = paired_bootstrap(PerUser(users, b + diff), PerUser(users, b), resamples=4000)
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert out.diff == pytest.approx(diff.mean())
    assert out.low == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert out.high == pytest.approx(diff.mean() + half, abs=0.15 * half)
    assert out.users == 2000


def test_pairing_removes_the_shared_per_user_spread() -> None:
    # Users differ a lot, the systems by a steady +0.02 plus small noise: paired, the interval
    # is far above zero although each system's own spread dwarfs the gain.
    rng = np.random.default_rng(3)
    b = rng.random(300)
    a = b + 0.02 + rng.normal(0, 0.01, 300)
    out = paired_bootstrap(PerUser(np.arange(300), a), PerUser(np.arange(300), b))
    assert out.low > 0.015 and out.high < 0.025


def test_different_users_are_an_error() -> None:
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap(
            PerUser(np.array([0, 1, 2]), np.zeros(3)), PerUser(np.array([0, 1, 3]), np.zeros(3))
        )
    with pytest.raises(ValueError, match="ascending"):
        PerUser(np.array([1, 0]), np.zeros(2))


def test_the_interval_is_the_percentile_interval_of_the_resampled_means() -> None:
    # 4 users of 400 gain 1.0, the rest nothing: a resampled mean is Binomial(400, 0.01)/400,
    # whose 2.5% and 97.5% quantiles are 1/400 and 8/400 (the exact binomial quantiles).
    # Skewed so that other bootstrap intervals differ: the "basic" one would be
    # [2 * 0.01 - 8/400, 2 * 0.01 - 1/400] = [0, 0.0175], the normal one symmetric about 0.01.
    diff = np.zeros(400)
    diff[[3, 50, 200, 399]] = 1.0
    users = np.arange(400)
    want_low, want_high = binom.ppf([0.025, 0.975], 400, 0.01) / 400
    for seed in (0, 1):
        out = paired_bootstrap(PerUser(users, diff), PerUser(users, np.zeros(400)), seed=seed)
        assert out.diff == pytest.approx(0.01)
        assert (out.low, out.high) == pytest.approx((want_low, want_high))
        assert (want_low, want_high) == pytest.approx((0.0025, 0.02))
