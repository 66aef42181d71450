"""The config base: checked fields, versioned round trip, clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from slimrank.config import Config, require


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
    with pytest.raises(ValueError, match=r"Inner\.bits=5"):
        Outer.from_dict({"inner": {"bits": 5}})


def test_unknown_fields_and_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        Outer.from_dict({"nmae": "typo"})
    with pytest.raises(ValueError, match="config_version 1, expected 2"):
        Outer.from_dict({"config_version": 1})
