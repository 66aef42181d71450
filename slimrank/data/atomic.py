"""Read RecBole atomic files (``.inter``, ``.user``, ``.item``): tab-separated, typed header.

The header names each column ``name:type`` with type one of ``token``, ``token_seq``,
``float``, ``float_seq``. Values are kept as strings here; callers convert the columns they
use, so that an unparsable value is reported with its file, column and line.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from slimrank.errors import DataError

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")


def read_atomic(path: str | Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Return ``(frame, types)``: string columns named without their type, and each type."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    with path.open(encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    types: dict[str, str] = {}
    for field in header:
        name, sep, kind = field.partition(":")
        if not sep or kind not in ATOMIC_TYPES:
            raise DataError(
                f"header field {field!r} is not name:type with type in {ATOMIC_TYPES}",
                path=path,
                line=1,
            )
        if name in types:
            raise DataError("column appears twice in the header", path=path, column=name, line=1)
        types[name] = kind
    try:
        frame = pd.read_csv(
            path,
            sep="\t",
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_NONE,
            encoding="utf-8",
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"cannot parse: {err}", path=path) from err
    frame.columns = list(types)
    return frame, types


def float_column(frame: pd.DataFrame, column: str, path: str | Path) -> np.ndarray:
    """Return ``frame[column]`` as float64, raising ``DataError`` at the first bad line."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)  # (n,)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"not a number: {frame[column].iloc[row]!r}",
            path=path,
            column=column,
            row=row,
            line=row + 2,
        )
    return values


def require_columns(types: dict[str, str], needed: tuple[str, ...], path: str | Path) -> None:
    """Raise ``DataError`` naming the first column of ``needed`` missing from the header."""
    for name in needed:
        if name not in types:
            raise DataError(f"missing column (have {', '.join(types)})", path=path, column=name)
