"""Validation of text queries and item filters: pure checks raising ``ValidationError``."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from slimrank.search.catalog import Catalog
from slimrank.search.filters import FilterError, ItemFilter
from slimrank.serving.validation import ValidationError

# A search box sends a few words; a longer text is a client bug or abuse, not a query.
MAX_TEXT_LENGTH = 512
MAX_FILTERS = 16
_WHITESPACE_CONTROLS = "\t\n\r"
# Zero-width non-joiner and joiner: format characters that are part of correct spelling
# (Persian, Hindi and other scripts) and of emoji sequences, so a search box sends them.
_JOINERS = "\u200c\u200d"


def check_text(text: str, max_length: int = MAX_TEXT_LENGTH, field: str = "text") -> str:
    """Return ``text`` if it has a visible character, at most ``max_length``, no controls.

    Tabs and line breaks count as spaces, and the zero-width (non-)joiner is text; any other
    control or format character (Unicode categories Cc, Cf: bidi overrides, BOMs) is
    refused with its position.
    """
    if len(text) > max_length:
        raise ValidationError(field, f"longer than {max_length} characters ({len(text)})")
    for i, ch in enumerate(text):
        if ch in _WHITESPACE_CONTROLS or ch in _JOINERS:
            continue
        category = unicodedata.category(ch)
        if category in ("Cc", "Cf"):
            what = "control" if category == "Cc" else "format"
            raise ValidationError(field, f"{what} character U+{ord(ch):04X} at position {i}")
    if not text.strip():
        raise ValidationError(field, "must not be empty or only spaces")
    return text


def filters_from_proto(messages: Sequence[Any]) -> tuple[ItemFilter, ...]:
    """Return the request's ``ItemFilter`` messages as :class:`ItemFilter` values."""
    if len(messages) > MAX_FILTERS:
        raise ValidationError("filters", f"at most {MAX_FILTERS} allowed, got {len(messages)}")
    out = []
    for i, message in enumerate(messages):
        if not message.field:
            raise ValidationError(f"filters[{i}].field", "must name an item attribute")
        out.append(
            ItemFilter(
                field=message.field,
                values=tuple(message.any_of),
                low=message.min if message.HasField("min") else None,
                high=message.max if message.HasField("max") else None,
            )
        )
    return tuple(out)


def check_filters(
    catalog: Catalog | None, filters: Sequence[ItemFilter], version: str
) -> np.ndarray | None:
    """Return the ``(items,)`` mask of items passing ``filters`` (None: no filters)."""
    if not filters:
        return None
    if catalog is None:
        raise ValidationError("filters", f"model {version} has no item attributes to filter on")
    try:
        return catalog.attributes.mask(filters)
    except FilterError as error:
        raise ValidationError(error.field, error.message) from None
