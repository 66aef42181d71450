"""Text normalization and tokens, shared by the offline index and the server's queries."""

from __future__ import annotations

import re
import unicodedata

_TOKEN = re.compile(r"[0-9a-z]+")


def normalize(text: str) -> str:
    """Return ``text`` case-folded with accents removed (``"Amélie"`` -> ``"amelie"``)."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def tokenize(text: str) -> list[str]:
    """Return the lowercase ASCII letter/digit runs of ``text``, in order (repeats kept)."""
    return _TOKEN.findall(normalize(text))


def ends_in_word(text: str) -> bool:
    """Return whether ``text`` ends inside a word: its last token is still being typed."""
    return bool(text) and bool(_TOKEN.match(normalize(text[-1])))
