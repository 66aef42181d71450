"""User interaction logs (CSV or Parquet) with optional user and item feature tables.

Logs need ``user_id``, ``item_id``, ``timestamp`` and may have ``rating`` (1.0 when absent).
Ids are read as strings and indexed in first-seen order. ``timestamp`` is unix seconds, or an
ISO-8601 date-time (taken as UTC when it names no zone), not before 1970. Feature files have
``user_id`` (or ``item_id``) plus feature columns, typed as in
:func:`slimrank.data.features.table_from_frame`.

Every check raises :class:`~slimrank.errors.DataError` naming the file, the column and the first
bad row (0-based, header excluded) and, for CSV, the line (row + 2). Loading only reads files.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from slimrank.data.dataset import Dataset, FeatureTable, IdMap, Interactions
from slimrank.data.features import table_from_frame
from slimrank.errors import DataError

logger = logging.getLogger(__name__)

LOG_COLUMNS = ("user_id", "item_id", "timestamp")
CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
# A logs directory: the interactions, then the optional user and item feature tables.
LOGS_DIR_FILES = ("interactions.parquet", "users.parquet", "items.parquet")
# 1e11 s is the year 5138: larger numbers are almost surely milliseconds or microseconds.
MAX_UNIX_SECONDS = 10**11


def load_logs(
    path: str | Path,
    user_features: str | Path | None = None,
    item_features: str | Path | None = None,
    text_columns: tuple[str, ...] = (),
) -> Dataset:
    """Return the dataset of a logs file and its optional feature files.

    ``text_columns`` of the item table are taken out of its features (the ranker never sees
    them) and kept as ``Dataset.item_text`` for the search index; missing cells are empty.
    """
    path = Path(path)
    frame = read_table(path, id_columns=("user_id", "item_id"))
    _require(frame, LOG_COLUMNS, path)
    if frame.empty:
        raise DataError("no interactions", path=path)
    for column in ("user_id", "item_id"):
        _check_ids(frame[column], path, column)
    user, users = _factorize_ids(frame["user_id"])
    item, items = _factorize_ids(frame["item_id"])
    timestamp = parse_timestamps(frame["timestamp"], path)
    if "rating" in frame.columns:
        rating = _numbers(frame["rating"], path, "rating")
    else:
        rating = np.ones(len(frame))  # (n,)
    keys = pd.DataFrame({"u": user, "i": item, "t": timestamp})  # int64 columns: fast hashing
    duplicated = keys.duplicated().to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        first = int(np.flatnonzero((keys == keys.iloc[row]).all(axis=1).to_numpy())[0])
        raise DataError(
            f"duplicate interaction (same user_id, item_id, timestamp as row {first})",
            **_where(path, "user_id", row),
        )
    interactions = Interactions(user, item, rating.astype(np.float32), timestamp)
    user_table = (
        load_feature_table(user_features, "user_id", users)
        if user_features is not None
        else FeatureTable.empty(len(users))
    )
    item_text: dict[str, np.ndarray] | None = None
    if item_features is not None:
        item_table, item_text = load_item_table(item_features, items, text_columns)
    elif text_columns:
        raise DataError(f"text columns {', '.join(text_columns)} given without an item table")
    else:
        item_table = FeatureTable.empty(len(items))
    name = path.name.split(".")[0]
    return Dataset(name, users, items, interactions, user_table, item_table, None, item_text)


def load_logs_dir(directory: str | Path) -> Dataset:
    """Return the dataset of a logs directory (see :data:`LOGS_DIR_FILES`), named after it."""
    directory = Path(directory)
    inter, users, items = (directory / name for name in LOGS_DIR_FILES)
    dataset = load_logs(
        inter, users if users.is_file() else None, items if items.is_file() else None
    )
    return dataclasses.replace(dataset, name=directory.name)


def load_item_table(
    path: str | Path, items: IdMap, text_columns: tuple[str, ...]
) -> tuple[FeatureTable, dict[str, np.ndarray]]:
    """Return the item features without ``text_columns``, and those columns as strings."""
    path = Path(path)
    frame = read_table(path, id_columns=("item_id",))
    _require(frame, ("item_id", *text_columns), path)
    table = load_feature_table(path, "item_id", items, drop=text_columns)
    index = items.index(_id_strings(frame["item_id"]), unknown="minus_one")
    text = {}
    for column in text_columns:
        values = np.full(len(items), "", dtype=object)
        values[index] = frame[column].fillna("").astype(str).to_numpy(dtype=object)
        text[column] = values.astype(str)
    return table, text


def load_feature_table(
    path: str | Path, id_column: str, ids: IdMap, drop: tuple[str, ...] = ()
) -> FeatureTable:
    """Return the features of ``ids`` read from ``path``; every row must name a known id.

    Columns in ``drop`` are left out (text columns, which the search index reads instead).
    """
    path = Path(path)
    frame = read_table(path, id_columns=(id_column,))
    _require(frame, (id_column,), path)
    _check_ids(frame[id_column], path, id_column)
    external = _id_strings(frame[id_column])
    duplicated = pd.Series(external).duplicated().to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise DataError(f"duplicate id {external[row]!r}", **_where(path, id_column, row))
    index = ids.index(external, unknown="minus_one")
    unknown = index < 0
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DataError(
            f"id {external[row]!r} does not appear in the interaction log",
            **_where(path, id_column, row),
        )
    missing = len(ids) - len(index)
    if missing:
        logger.info("%s: %d of %d ids have no feature row (unknown)", path, missing, len(ids))
    features = frame.drop(columns=[id_column, *drop])
    return table_from_frame(features, index, len(ids))


def read_table(path: Path, id_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Return a CSV or Parquet file as a frame.

    CSV: ``id_columns`` are read as strings (``007`` stays ``007``), the other column types
    are inferred; only empty cells are null (``NA`` or ``null`` are ordinary strings).
    """
    if not path.is_file():
        raise DataError("file not found", path=path)
    try:
        if _is_csv(path):
            sep = "\t" if path.name.endswith(".tsv") else ","
            # pandas renames a repeated header ("a", "a.1"), so read the header as it is first.
            header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str)
            _refuse_repeated_columns(header.iloc[0].tolist(), path)
            dtype = dict.fromkeys(id_columns, str)
            return pd.read_csv(path, sep=sep, dtype=dtype, keep_default_na=False, na_values=[""])
        if path.name.endswith(PARQUET_SUFFIXES):
            return pd.read_parquet(path)  # pyarrow refuses a repeated column name itself
    except DataError:
        raise
    except UnicodeDecodeError as err:
        line = first_undecodable_line(path)
        raise _unparsable(f"not UTF-8 ({err.reason})", path, line) from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise _unparsable(str(err), path, _parser_error_line(str(err))) from err
    except (OSError, ValueError) as err:  # pyarrow's errors subclass these
        raise DataError(f"cannot read: {err}", path=path) from err
    raise DataError(
        f"unknown file type; expected one of {CSV_SUFFIXES + PARQUET_SUFFIXES}", path=path
    )


def _refuse_repeated_columns(names: list[object], path: Path) -> None:
    """Raise if a column name appears twice: which of the two is meant cannot be known."""
    seen: set[object] = set()
    for name in names:
        if name in seen:
            raise DataError(
                "column name appears more than once", path=path, column=str(name), line=1
            )
        seen.add(name)


# pandas' C parser names a bad line in one of these ways: 1-based "line N" (a row with too many
# fields), or a 0-based "row N" of the file (an unclosed quote).
_PARSER_LINE = (
    (re.compile(r"Expected \d+ fields in line (\d+)"), 0),
    (re.compile(r"EOF inside string starting at row (\d+)"), 1),
)


def _unparsable(reason: str, path: Path, line: int | None) -> DataError:
    """The error for a file that cannot be parsed at ``line`` (1-based, the header is line 1)."""
    return DataError(
        f"cannot parse: {reason}", path=path, row=None if line is None else line - 2, line=line
    )


def _parser_error_line(message: str) -> int | None:
    """Return the 1-based file line a pandas parser error names, if it names one."""
    for pattern, shift in _PARSER_LINE:
        match = pattern.search(message)
        if match:
            return int(match[1]) + shift
    return None


def first_undecodable_line(path: Path) -> int | None:
    """Return the 1-based number of the first line of ``path`` that is not UTF-8, if any.

    Read line by line (only on the error path): pandas' decode error gives a byte offset
    inside one of its read buffers, which names no line.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def parse_timestamps(column: pd.Series, path: Path) -> np.ndarray:
    """Return int64 unix seconds of numbers or ISO-8601 date-times; the first bad row raises.

    Before 1970 (a negative number, or such a date) is refused: no interaction log holds
    one, and a sentinel such as ``-1`` would silently be read as the oldest event.
    """
    seconds = np.zeros(len(column), dtype=np.int64)  # (n,)
    if pd.api.types.is_datetime64_any_dtype(column):
        numeric = np.full(len(column), np.nan)
        dates = column.notna().to_numpy()
    else:
        numeric = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
        dates = ~np.isfinite(numeric) & column.notna().to_numpy()
    bad = ~np.isfinite(numeric)
    seconds[~bad] = numeric[~bad].astype(np.int64)
    if dates.any():
        parsed = pd.to_datetime(column[dates], utc=True, errors="coerce", format="ISO8601")
        ok = parsed.notna().to_numpy()
        rows = np.flatnonzero(dates)[ok]
        delta = parsed[ok] - pd.Timestamp(0, tz="UTC")
        seconds[rows] = (delta // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
        bad[rows] = False
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"not a unix time or ISO-8601 date-time: {_shown(column.iloc[row])}",
            **_where(path, "timestamp", row),
        )
    early = seconds < 0
    if early.any():  # a sentinel such as -1 would otherwise become the oldest interaction
        row = int(np.flatnonzero(early)[0])
        raise DataError(
            f"{_shown(column.iloc[row])} is before 1970-01-01: timestamps of interactions "
            "must be unix seconds from 0 on",
            **_where(path, "timestamp", row),
        )
    too_big = seconds >= MAX_UNIX_SECONDS
    if too_big.any():
        row = int(np.flatnonzero(too_big)[0])
        raise DataError(
            f"{column.iloc[row]!r} is after the year 5000 in seconds: milliseconds? "
            "timestamps must be unix seconds",
            **_where(path, "timestamp", row),
        )
    return seconds


def _numbers(column: pd.Series, path: Path, name: str) -> np.ndarray:
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"not a finite number: {_shown(column.iloc[row])}", **_where(path, name, row)
        )
    return values


def _check_ids(column: pd.Series, path: Path, name: str) -> None:
    null = column.isna().to_numpy().copy()  # (n,)
    if not pd.api.types.is_numeric_dtype(column):
        # Only text can be blank; an integer column as text is one Python str per row
        # (1.5 GB and 5 s for 20M rows).
        null |= (column.astype(str).str.strip() == "").to_numpy()
    if null.any():
        raise DataError("null or empty id", **_where(path, name, int(np.flatnonzero(null)[0])))


def _shown(value: object) -> str:
    """Return a cell as an error shows it: missing cells (NaN, None) as "a missing value"."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "a missing value (an empty cell, or a row with too few fields)"
    return repr(value.item() if isinstance(value, np.generic) else value)


def _id_strings(column: pd.Series) -> np.ndarray:
    return column.astype(str).to_numpy(dtype=object)  # (n,)


def _factorize_ids(column: pd.Series) -> tuple[np.ndarray, IdMap]:
    """Return int64 dense codes ``(n,)`` in first-seen order and their :class:`IdMap`.

    Factorizes the raw values (fast for integer Parquet ids) and names them as strings; a column
    whose distinct values collide as strings (e.g. ``1`` and ``"1"``) is factorized as strings.
    """
    codes, uniques = pd.factorize(column)
    names = pd.Series(uniques).astype(str)
    if names.duplicated().any():
        codes, uniques = pd.factorize(column.astype(str))
        names = pd.Series(uniques)
    return codes.astype(np.int64), IdMap(names.to_numpy(dtype=object))


def _require(frame: pd.DataFrame, needed: tuple[str, ...], path: Path) -> None:
    for name in needed:
        if name not in frame.columns:
            have = ", ".join(map(str, frame.columns))
            raise DataError(f"missing column (have: {have})", path=path, column=name)


def _is_csv(path: Path) -> bool:
    return path.name.endswith(CSV_SUFFIXES)


def _where(path: Path, column: str, row: int) -> dict[str, object]:
    """Return DataError's location keywords for a 0-based data row."""
    return {"path": path, "column": column, "row": row, "line": row + 2 if _is_csv(path) else None}
