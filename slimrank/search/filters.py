"""Item attributes that requests filter on (genre, year range, any categorical column).

An :class:`ItemAttributes` holds, per item, categorical values (one label each), multi-label
sets (e.g. genres) and numbers. A request's filters are ANDed; a categorical or multi-label
filter keeps items with any of its values, a numeric one items within ``[min, max]``. The
result is a boolean mask over items, applied before ranking.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np


class FilterError(ValueError):
    """A filter names an unknown attribute or value, or mixes kinds; ``field`` says where."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class ItemFilter:
    """One filter: ``values`` for a categorical or multi-label field, ``low``/``high`` else."""

    field: str
    values: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class ItemAttributes:
    """The filterable attributes of ``n_items`` items (row = dense item index)."""

    n_items: int
    # name -> ((items,) int64 codes into vocab; -1 missing, vocab)
    categorical: Mapping[str, tuple[np.ndarray, tuple[str, ...]]] = dataclasses.field(
        default_factory=dict
    )
    # name -> ((items, m) bool, m labels)
    multi_label: Mapping[str, tuple[np.ndarray, tuple[str, ...]]] = dataclasses.field(
        default_factory=dict
    )
    numeric: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)  # NaN missing

    def __post_init__(self) -> None:
        names = [*self.categorical, *self.multi_label, *self.numeric]
        if len(names) != len(set(names)):
            raise ValueError(f"ItemAttributes: a name repeats in {names}")
        for name, (codes, vocab) in self.categorical.items():
            if codes.shape != (self.n_items,) or (
                codes.size and (codes.min() < -1 or codes.max() >= len(vocab))
            ):
                raise ValueError(f"ItemAttributes: categorical {name!r} codes do not fit")
        for name, (matrix, labels) in self.multi_label.items():
            if matrix.shape != (self.n_items, len(labels)):
                raise ValueError(f"ItemAttributes: multi-label {name!r} is {matrix.shape}")
        for name, values in self.numeric.items():
            if values.shape != (self.n_items,):
                raise ValueError(f"ItemAttributes: numeric {name!r} is {values.shape}")

    @property
    def names(self) -> list[str]:
        """Every filterable attribute, sorted."""
        return sorted([*self.categorical, *self.multi_label, *self.numeric])

    def mask(self, filters: Sequence[ItemFilter], where: str = "filters") -> np.ndarray | None:
        """Return the ``(items,)`` bool mask of items passing every filter (None: no filters).

        ``FilterError`` naming ``where[i]`` and the field for an unknown attribute or value,
        a range on a labelled attribute, values on a numeric one, or an empty filter.
        """
        if not filters:
            return None
        keep = np.ones(self.n_items, dtype=bool)
        for i, spec in enumerate(filters):
            keep &= self._one(spec, f"{where}[{i}]")
        return keep

    def _one(self, spec: ItemFilter, where: str) -> np.ndarray:
        name = spec.field
        ranged = spec.low is not None or spec.high is not None
        if name in self.numeric:
            if spec.values:
                raise FilterError(f"{where}.any_of", f"{name!r} is numeric: use min / max")
            if not ranged:
                raise FilterError(where, f"a filter on {name!r} needs min or max")
            for key, bound in (("min", spec.low), ("max", spec.high)):
                if bound is not None and not math.isfinite(bound):
                    raise FilterError(f"{where}.{key}", f"must be a finite number, got {bound}")
            low = -math.inf if spec.low is None else spec.low
            high = math.inf if spec.high is None else spec.high
            if low > high:
                raise FilterError(f"{where}.min", f"{low} is above max {high}")
            values = self.numeric[name]
            return (values >= low) & (values <= high)  # NaN (missing) passes neither
        if name in self.categorical or name in self.multi_label:
            if ranged:
                raise FilterError(f"{where}.min", f"{name!r} has labels, not numbers: use any_of")
            if not spec.values:
                raise FilterError(f"{where}.any_of", f"a filter on {name!r} needs values")
            if name in self.categorical:
                codes, vocab = self.categorical[name]
                wanted = [
                    self._label(vocab, v, name, f"{where}.any_of[{j}]")
                    for j, v in enumerate(spec.values)
                ]
                return np.isin(codes, wanted)
            matrix, labels = self.multi_label[name]
            cols = [
                self._label(labels, v, name, f"{where}.any_of[{j}]")
                for j, v in enumerate(spec.values)
            ]
            return matrix[:, cols].any(axis=1)
        have = ", ".join(self.names) or "none"
        raise FilterError(f"{where}.field", f"unknown item attribute {name!r} (have {have})")

    @staticmethod
    def _label(vocab: Sequence[str], value: str, name: str, where: str) -> int:
        try:
            return list(vocab).index(value)
        except ValueError:
            shown = ", ".join(list(vocab)[:30])
            message = f"{value!r} is not a value of {name!r} (have {shown})"
            raise FilterError(where, message) from None
