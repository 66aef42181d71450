"""Request validation and the server config's checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimrank.serving.config import ServerConfig
from slimrank.serving.validation import (
    ValidationError,
    check_ids,
    check_k,
    check_user_id,
    check_vector,
)


@pytest.mark.parametrize("k", [0, -1, 101])
def test_k_out_of_range(k: int) -> None:
    with pytest.raises(ValidationError, match=r"^k: must be in \[1, 100\]") as info:
        check_k(k, 100)
    assert info.value.field == "k"


def test_k_in_range() -> None:
    assert check_k(1, 100) == 1 and check_k(100, 100) == 100


def test_ids() -> None:
    assert check_ids(["a", "b"], 2, 5, "exclude_item_ids") == ("a", "b")
    with pytest.raises(ValidationError, match=r"^exclude_item_ids: at most 2"):
        check_ids(["a", "b", "c"], 2, 5, "exclude_item_ids")
    with pytest.raises(ValidationError, match=r"^recent_item_ids: id at position 1 is empty"):
        check_ids(["a", ""], 2, 5, "recent_item_ids")
    with pytest.raises(ValidationError, match="longer than 5"):
        check_ids(["abcdef"], 2, 5, "recent_item_ids")


def test_user_id() -> None:
    assert check_user_id("", 4) == ""
    with pytest.raises(ValidationError, match=r"^user_id: longer than 4"):
        check_user_id("abcde", 4)


def test_the_limits_are_inclusive() -> None:
    """At most ``max_count`` ids of at most ``max_length`` characters: both are allowed."""
    assert check_ids(["abcde", "vwxyz"], 2, 5, "exclude_item_ids") == ("abcde", "vwxyz")
    assert check_user_id("abcd", 4) == "abcd"


def test_ids_are_kept_as_sent() -> None:
    """Recent items are oldest first and may repeat; any non-empty id is the caller's own."""
    assert check_ids(["b", "a", " ", "b"], 4, 5, "recent_item_ids") == ("b", "a", " ", "b")
    assert check_user_id(" u1 ", 8) == " u1 "


def test_vector() -> None:
    got = check_vector([1.0, 2.0, 3.0], 3)
    assert got.dtype == np.float32 and got.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValidationError, match=r"^query_vector: must have dimension 3, got 2"):
        check_vector([1.0, 2.0], 3)
    with pytest.raises(ValidationError, match="NaN or Inf at index 1"):
        check_vector([1.0, math.nan, 3.0], 3)
    with pytest.raises(ValidationError, match="NaN or Inf at index 2"):
        check_vector([1.0, 2.0, -math.inf], 3)


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=4, max_size=4))
def test_vector_accepts_exactly_the_finite(values: list[float]) -> None:
    finite = all(math.isfinite(v) for v in values)
    try:
        check_vector(values, 4)
    except ValidationError:
        assert not finite
    else:
        assert finite


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_workers": 8, "max_inflight": 8}, "max_workers"),
        ({"max_k": 300}, "n_candidates"),
        ({"port": 70000}, "port"),
        ({"metrics_port": -1}, "metrics_port"),
        ({"max_pending_rpcs": 2}, "max_pending_rpcs"),
        ({"host": ""}, "host"),
        ({"core_queue_refresh_s": -0.001}, "core_queue_refresh_s"),
        ({"burst_wait_s": 0.0}, "burst_wait_s"),
        ({"burst_recovery_s": -1.0}, "burst_recovery_s"),
    ],
)
def test_server_config_rejects(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"ServerConfig\.{field}="):
        ServerConfig(**overrides)  # type: ignore[arg-type]


def test_server_config_round_trips() -> None:
    config = ServerConfig(max_k=10, n_candidates=50, metrics_port=0, reflection=True)
    assert ServerConfig.from_dict(config.to_dict()) == config
