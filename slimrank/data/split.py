"""Per-user random split, counted exactly like RecBole 1.2.1's ``RS`` split with group_by=user.

RecBole (``recbole/data/dataset/dataset.py``, ``build``, ``split_by_ratio``,
``_calcu_split_ids``) shuffles all interactions, groups them by user in shuffled order, and cuts
each user's list into parts whose sizes depend only on the user's count ``n``: every part but
the first gets ``int(ratio * n)``, the first the rest, then each later part whose ``ratio * n``
lies in ``(0, 1)`` takes one interaction from the first part while the first has more than one.
We reproduce those counts exactly; the shuffle is ``np.random.default_rng(seed)`` (PCG64), so
the split is the same on every machine, though not the same permutation as RecBole's torch one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slimrank.config import Config, require
from slimrank.data.dataset import Interactions, Split


@dataclasses.dataclass(frozen=True)
class SplitConfig(Config):
    """Per-user random split: train / valid / test ratios (normalized) and the shuffle seed."""

    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 2020

    def __post_init__(self) -> None:
        require(len(self.ratios) == 3, self, "ratios", self.ratios, "need three ratios")
        ok = all(r >= 0 for r in self.ratios) and self.ratios[0] > 0
        require(ok, self, "ratios", self.ratios, "must be non-negative, train positive")
        require(isinstance(self.seed, int) and self.seed >= 0, self, "seed", self.seed, ">= 0")


def part_sizes(total: int, ratios: tuple[float, ...]) -> list[int]:
    """Return the size of each part of ``total`` items (RecBole's ``_calcu_split_ids`` rule)."""
    tot_ratio = sum(ratios)
    norm = [r / tot_ratio for r in ratios]
    cnt = [int(norm[i] * total) for i in range(len(norm))]
    cnt[0] = total - sum(cnt[1:])
    for i in range(1, len(norm)):
        if cnt[0] <= 1:
            break
        if 0 < norm[-i] * total < 1:
            cnt[-i] += 1
            cnt[0] -= 1
    return cnt


def split_parts(
    user: np.ndarray, ratios: tuple[float, ...], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(part, order)``: the part (0..len(ratios)-1) of each row, and the shuffle.

    ``order`` is the permutation of rows the rows were cut in; each part, read in ``order``,
    holds every user's rows in shuffled order.
    """
    if len(ratios) < 2 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios={ratios!r}: need two or more non-negative, positive-sum ratios")
    user = np.asarray(user, dtype=np.int64)
    n = len(user)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # (n,)
    # Group by user keeping the shuffled order inside each group.
    grouped = order[np.argsort(user[order], kind="stable")]  # (n,)
    users_sorted = user[grouped]
    starts = np.r_[0, np.flatnonzero(np.diff(users_sorted)) + 1]
    counts = np.diff(np.r_[starts, n])
    position = np.arange(n) - np.repeat(starts, counts)  # rank inside the user's group
    # Cumulative cut points per distinct group size, looked up per row.
    sizes, inverse = np.unique(counts, return_inverse=True)
    cuts = np.array([np.cumsum(part_sizes(int(s), ratios)) for s in sizes], dtype=np.int64)
    row_cuts = np.repeat(cuts[inverse], counts, axis=0)  # (n, P)
    part_sorted = (position[:, None] >= row_cuts).sum(axis=1)  # (n,)
    part = np.empty(n, dtype=np.int64)
    part[grouped] = part_sorted
    return part, order


def split_by_user(
    interactions: Interactions,
    n_users: int,
    n_items: int,
    ratios: tuple[float, ...] = (0.8, 0.1, 0.1),
    seed: int = 2020,
) -> Split:
    """Return the train / valid / test split; each part's rows are in shuffled order."""
    if len(ratios) != 3:
        raise ValueError(f"ratios={ratios!r}: a Split needs exactly three ratios")
    part, order = split_parts(interactions.user, ratios, seed)
    part_in_order = part[order]
    train, valid, test = (interactions.take(order[part_in_order == p]) for p in range(3))
    return Split(train=train, valid=valid, test=test, n_users=n_users, n_items=n_items)
