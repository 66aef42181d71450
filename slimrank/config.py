"""The base of every component's config dataclass: checked fields, versioned dicts.

Each component defines one frozen dataclass that subclasses :class:`Config`, checks its
fields in ``__post_init__`` with :func:`require`, and round-trips through
``to_dict`` / ``from_dict`` so that it can be stored in a bundle manifest and read back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self


def require(ok: bool, owner: object, field: str, value: object, why: str) -> None:
    """Raise ``ValueError`` naming the config class, the field and its value unless ``ok``."""
    if not ok:
        name = owner if isinstance(owner, str) else type(owner).__name__
        raise ValueError(f"{name}.{field}={value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Mixin for frozen config dataclasses: ``to_dict`` and ``from_dict`` with a version."""

    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as plain JSON-able values plus ``config_version``."""
        out: dict[str, Any] = {"config_version": self.VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build the config from ``to_dict`` output; unknown keys and versions are errors."""
        data = dict(data)
        version = data.pop("config_version", cls.VERSION)
        if version != cls.VERSION:
            raise ValueError(f"{cls.__name__}: config_version {version!r}, expected {cls.VERSION}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            default = fields[name].default
            factory = fields[name].default_factory
            sample = factory() if factory is not dataclasses.MISSING else default
            if isinstance(sample, Config) and isinstance(value, dict):
                value = type(sample).from_dict(value)
            elif isinstance(sample, tuple) and isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)
