"""Bundle version names: ``v<sequence>-<UTC time>``, e.g. ``v000012-20261122T143000Z``.

The sequence is one more than the highest existing one, so it increases monotonically even
when two versions are published within the same second; the time is when the version was
published. Names sort by their sequence (``version_key``); with six or fewer digits they also
sort as plain strings. Names are strict ASCII: nothing else, not even a final newline or
another script's digits, is a version.
"""

from __future__ import annotations

import datetime as dt
import re

# ASCII only, the whole string: \d would also take other scripts' digits, and $ a final newline.
_NAME = re.compile(r"v(\d{6,})-(\d{8}T\d{6}Z)", re.ASCII)
_STAMP = "%Y%m%dT%H%M%SZ"


def format_version(sequence: int, when: dt.datetime) -> str:
    """Return the version name for ``sequence`` published at ``when`` (made UTC)."""
    if sequence < 1:
        raise ValueError(f"version sequence must be >= 1, got {sequence}")
    return f"v{sequence:06d}-{when.astimezone(dt.UTC).strftime(_STAMP)}"


def parse_version(name: str) -> int | None:
    """Return the sequence number of a version name, or ``None`` if ``name`` is not one."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    try:
        dt.datetime.strptime(m.group(2), _STAMP)
    except ValueError:
        return None
    return int(m.group(1))


def version_key(name: str) -> int:
    """Sort key of a version name (its sequence); raises ``ValueError`` on other names."""
    seq = parse_version(name)
    if seq is None:
        raise ValueError(f"not a bundle version name: {name!r}")
    return seq


def utc_iso(when: dt.datetime) -> str:
    """Return ``when`` as a UTC ISO 8601 string with a ``Z`` suffix and whole seconds."""
    return when.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
