"""The config base: checked fields, versioned round trip, clear errors."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import pytest

from slimrank.config import Config, ConfigError, require


@dataclasses.dataclass(frozen=True)
class Inner(Config):
    bits: int = 8

    def __post_init__(self) -> None:
        require(self.bits in (4, 8), self, "bits", self.bits, "must be 4 or 8")


@dataclasses.dataclass(frozen=True)
class Outer(Config):
    VERSION = 2
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_round_trip_keeps_nested_configs_and_tuples() -> None:
    cfg = Outer(name="y", sizes=(3,), inner=Inner(bits=4))
    data = cfg.to_dict()
    assert data == {
        "config_version": 2,
        "name": "y",
        "sizes": [3],
        "inner": {"config_version": 1, "bits": 4},
    }
    assert Outer.from_dict(data) == cfg


def test_bad_field_names_class_field_and_value() -> None:
    with pytest.raises(ValueError, match=r"Inner\.bits=3: must be 4 or 8"):
        Inner(bits=3)
    with pytest.raises(ConfigError, match=r"^inner\.bits: 5: must be 4 or 8$"):
        Outer.from_dict({"inner": {"bits": 5}})


def test_unknown_fields_and_versions_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^nmae: unknown key \(did you mean name\?\)$"):
        Outer.from_dict({"nmae": "typo"})
    with pytest.raises(ConfigError, match=r"^inner\.bitz: unknown key"):
        Outer.from_dict({"inner": {"bitz": 4}})
    with pytest.raises(ConfigError, match="config_version: 1, expected 2"):
        Outer.from_dict({"config_version": 1})


@dataclasses.dataclass(frozen=True)
class Typed(Config):
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    label: str = "a"
    maybe: int | None = None
    pair: tuple[float, float] = (0.0, 1.0)
    names: list[str] = dataclasses.field(default_factory=list)
    mode: Literal["fast", "exact"] = "fast"
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"count": "x"}, "count", "an integer, got a string ('x')"),
        ({"count": True}, "count", "an integer, got a boolean (True)"),  # bool is not an int
        ({"count": 1.5}, "count", "an integer, got a number (1.5)"),
        ({"rate": "0.1"}, "rate", "a number, got a string"),
        ({"rate": False}, "rate", "a number, got a boolean"),
        ({"flag": 1}, "flag", "true or false, got an integer (1)"),
        ({"label": 3}, "label", "a string, got an integer"),
        ({"maybe": "3"}, "maybe", "an integer, got a string"),
        ({"pair": [1.0]}, "pair", "a list of 2 (a number, a number), got a list"),
        ({"pair": [1.0, "b"]}, "pair[1]", "a number, got a string"),
        ({"names": "abc"}, "names", "a list of strings, got a string"),
        ({"names": ["a", 2]}, "names[1]", "a string, got an integer"),
        ({"mode": "slow"}, "mode", "one of 'fast', 'exact', got a string ('slow')"),
        ({"weights": {"a": "x"}}, "weights.a", "a number, got a string"),
        ({"inner": 8}, "inner", "a table, got an integer"),
        ({"inner": {"bits": "8"}}, "inner.bits", "an integer, got a string"),
    ],
)
def test_wrong_types_name_the_dotted_key_and_what_was_expected(
    data: dict, key: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: expected {re.escape(expected)}"):
        Typed.from_dict(data)


def test_right_types_pass_and_ints_widen_to_float() -> None:
    cfg = Typed.from_dict(
        {
            "count": 2,
            "rate": 1,
            "flag": True,
            "maybe": 3,
            "pair": [0, 0.5],
            "names": ["a"],
            "mode": "exact",
            "weights": {"a": 1},
        }
    )
    assert cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert cfg.pair == (0.0, 0.5) and cfg.maybe == 3 and cfg.weights == {"a": 1.0}
    assert Typed.from_dict(cfg.to_dict()) == cfg
    assert Typed.from_dict({"maybe": None}).maybe is None


def test_a_required_field_that_is_missing_is_named() -> None:
    @dataclasses.dataclass(frozen=True)
    class Needs(Config):
        size: int

    with pytest.raises(ConfigError, match=r"^size: missing \(expected an integer\)$"):
        Needs.from_dict({})
