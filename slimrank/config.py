"""The base of every component's config dataclass: checked fields, versioned dicts.

Each component defines one frozen dataclass that subclasses :class:`Config`, checks its
fields in ``__post_init__`` with :func:`require`, and round-trips through
``to_dict`` / ``from_dict`` so that it can be stored in a bundle manifest and read back.

``from_dict`` checks every value against the dataclass's type hints before anything is built
(:func:`check_value`): ``int``, ``float`` (an int is accepted and widened), ``bool`` (never
an int), ``str``, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``,
``dict[K, V]``, ``Literal[...]`` and nested configs. Every error is a :class:`ConfigError`
naming the dotted key (``student.seed``) and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, ClassVar, Literal, Self, Union

from slimrank.errors import SlimrankError


class FieldError(ValueError):
    """A field's value is out of range (raised by :func:`require`)."""

    def __init__(self, owner: str, field: str, value: object, why: str) -> None:
        self.owner, self.field, self.value, self.why = owner, field, value, why
        super().__init__(f"{owner}.{field}={value!r}: {why}")


class ConfigError(SlimrankError, ValueError):
    """A config value of the wrong type or range, or an unknown or missing key.

    ``key`` is the dotted key (``student.seed``; empty for the whole config).
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)

    def within(self, where: str) -> ConfigError:
        """Return the same error prefixed with ``where`` (a file name)."""
        err = ConfigError(self.key, self.detail)
        err.args = (f"{where}: {self}",)
        return err


def require(ok: bool, owner: object, field: str, value: object, why: str) -> None:
    """Raise :class:`FieldError` naming the config class, the field and its value unless ``ok``."""
    if not ok:
        name = owner if isinstance(owner, str) else type(owner).__name__
        raise FieldError(name, field, value, why)


def _join(prefix: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{prefix}[{name}]"
    return f"{prefix}.{name}" if prefix else name


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def describe(hint: Any) -> str:
    """Return what a value of type ``hint`` looks like, in words (``"a list of integers"``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _NAMES:
        return _NAMES[hint]
    if hint is type(None):
        return "nothing (omit the key)"
    if isinstance(hint, type) and issubclass(hint, Config):
        return "a table"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_plural(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
    if origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        return "a table"
    return f"a {getattr(hint, '__name__', hint)}"


def _plural(hint: Any) -> str:
    word = describe(hint)
    for article in ("an ", "a "):
        if word.startswith(article):
            word = word.removeprefix(article) + "s"
            break
    return word.replace("true or falses", "true/false values")


def _wrong(key: str, hint: Any, value: object) -> ConfigError:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )
    if isinstance(value, dict):
        kind = "a table"
    elif isinstance(value, list | tuple):
        kind = "a list"
    return ConfigError(key, f"expected {describe(hint)}, got {kind} ({value!r})")


def check_value(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` checked against the type ``hint`` (tuples built, ints widened to float).

    Raises :class:`ConfigError` naming ``key`` and what was expected.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise _wrong(key, hint, value)
        return hint.from_dict(value, key=key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(key, hint, value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong(key, hint, value)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _wrong(key, hint, value)
    if hint is type(None):
        if value is None:
            return value
        raise _wrong(key, hint, value)
    if origin is Literal:
        # 1 == True in Python: compare the type as well as the value.
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _wrong(key, hint, value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            try:
                return check_value(value, arg, key)
            except ConfigError as err:
                if isinstance(value, dict | list | tuple) and _matches_shape(value, arg):
                    raise err  # the right container with a wrong element: say which
        raise _wrong(key, hint, value)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise _wrong(key, hint, value)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _wrong(key, hint, value)
            pairs = enumerate(zip(value, args, strict=True))
            items = [check_value(v, a, _join(key, i)) for i, (v, a) in pairs]
        else:
            item = args[0] if args else Any
            items = [check_value(v, item, _join(key, i)) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong(key, hint, value)
        k_hint, v_hint = args or (Any, Any)
        return {
            check_value(k, k_hint, key): check_value(v, v_hint, _join(key, str(k)))
            for k, v in value.items()
        }
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _wrong(key, hint, value)
    return value  # a hint this checker does not know: left to the class's own checks


def _matches_shape(value: Any, hint: Any) -> bool:
    """True if ``value`` is the container ``hint`` asks for (so an element is what is wrong)."""
    origin = typing.get_origin(hint)
    if isinstance(value, dict):
        return origin is dict or (isinstance(hint, type) and issubclass(hint, Config))
    return origin in (tuple, list)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


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
    def from_dict(cls, data: dict[str, Any], key: str = "") -> Self:
        """Build the config from ``to_dict`` output (or a TOML table), checking every value.

        ``key`` is where this table sits in a bigger config (``"student"``); errors name the
        dotted key. Unknown keys, values of the wrong type, missing required keys, values out
        of range and other versions are :class:`ConfigError`.
        """
        if not isinstance(data, dict):
            raise _wrong(key, cls, data)
        data = dict(data)
        version = data.pop("config_version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(_join(key, "config_version"), f"{version!r}, expected {cls.VERSION}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for name in data:
            if name not in fields:
                close = difflib.get_close_matches(str(name), list(fields), n=1)
                hint = f"did you mean {close[0]}?" if close else "known: " + ", ".join(fields)
                raise ConfigError(_join(key, name), f"unknown key ({hint})")
        hints = _hints(cls)
        kwargs = {name: check_value(v, hints[name], _join(key, name)) for name, v in data.items()}
        for name, f in fields.items():
            no_default = f.default is dataclasses.MISSING
            if name not in kwargs and no_default and f.default_factory is dataclasses.MISSING:
                raise ConfigError(_join(key, name), f"missing (expected {describe(hints[name])})")
        try:
            return cls(**kwargs)
        except FieldError as err:
            if err.owner != cls.__name__:
                raise
            raise ConfigError(_join(key, err.field), f"{err.value!r}: {err.why}") from None
