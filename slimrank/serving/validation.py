"""Request validation: pure checks that raise :class:`ValidationError` naming the field."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ValidationError(ValueError):
    """A request field is invalid; the servicer answers INVALID_ARGUMENT with this message."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def check_k(k: int, max_k: int, field: str = "k") -> int:
    """Return ``k`` if it is in ``[1, max_k]``."""
    if not 1 <= k <= max_k:
        raise ValidationError(field, f"must be in [1, {max_k}], got {k}")
    return k


def check_ids(ids: Sequence[str], max_count: int, max_length: int, field: str) -> tuple[str, ...]:
    """Return the ids as a tuple if there are at most ``max_count``, each non-empty and short."""
    if len(ids) > max_count:
        raise ValidationError(field, f"at most {max_count} ids allowed, got {len(ids)}")
    for i, item in enumerate(ids):
        if not item:
            raise ValidationError(field, f"id at position {i} is empty")
        if len(item) > max_length:
            raise ValidationError(field, f"id at position {i} is longer than {max_length}")
    return tuple(ids)


def check_user_id(user_id: str, max_length: int, field: str = "user_id") -> str:
    """Return ``user_id`` if it is at most ``max_length`` long; empty is allowed (cold start)."""
    if len(user_id) > max_length:
        raise ValidationError(field, f"longer than {max_length} characters")
    return user_id


def check_vector(values: Sequence[float], dim: int, field: str = "query_vector") -> np.ndarray:
    """Return the values as a ``(dim,)`` float32 array if the length is ``dim`` and all finite."""
    vector = np.asarray(values, dtype=np.float32)  # (dim,)
    if vector.shape != (dim,):
        raise ValidationError(field, f"must have dimension {dim}, got {vector.size}")
    bad = np.flatnonzero(~np.isfinite(vector))
    if bad.size:
        raise ValidationError(field, f"must be finite; NaN or Inf at index {int(bad[0])}")
    return vector
