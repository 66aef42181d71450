"""Errors that the CLI and the server turn into clear messages."""

from __future__ import annotations

from pathlib import Path


class SlimrankError(Exception):
    """Base of the errors a user can act on; the CLI prints them without a traceback."""


class DataError(SlimrankError, ValueError):
    """Bad input data: says which file, column and row (or line) was wrong."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        column: str | None = None,
        row: int | None = None,
        line: int | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.column = column
        self.row = row
        self.line = line
        where = []
        if self.path is not None:
            where.append(self.path + (f":{line}" if line is not None else ""))
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class IntegrityError(SlimrankError):
    """A file failed its checksum, or is missing or truncated."""
