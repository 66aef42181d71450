"""Bad input at scale: one bad row in the middle of a 200k-row log is named, in Parquet and CSV,
through the same loader (and CLI) a customer uses; a world directory with a bad row too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slimrank.cli import main
from slimrank.data.dataset import load_dataset
from slimrank.data.logs import load_logs
from slimrank.errors import DataError

ROWS = 200_000
BAD = 123_457


def _columns(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "user_id": np.arange(ROWS, dtype=np.int64) // 20,
        "item_id": rng.integers(0, 50_000, ROWS),
        "timestamp": 1_600_000_000 + np.arange(ROWS, dtype=np.int64) * 7,
    }


def _parquet(path: Path, columns: dict[str, object]) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=50_000)
    return path


def test_nan_timestamp_in_the_middle_of_a_parquet_log(tmp_path: Path) -> None:
    cols = _columns()
    stamps = cols["timestamp"].astype(np.float64)
    stamps[BAD] = np.nan
    path = _parquet(tmp_path / "logs.parquet", {**cols, "timestamp": stamps})
    with pytest.raises(DataError) as err:
        load_logs(path)
    assert (err.value.column, err.value.row, err.value.line) == ("timestamp", BAD, None)


def test_null_user_id_in_the_middle_of_a_parquet_log(tmp_path: Path) -> None:
    cols = _columns()
    mask = np.zeros(ROWS, dtype=bool)
    mask[BAD] = True
    users = pa.array(cols["user_id"], mask=mask)  # an int64 column with one null
    path = _parquet(tmp_path / "logs.parquet", {**cols, "user_id": users})
    with pytest.raises(DataError) as err:
        load_logs(path)
    assert (err.value.column, err.value.row) == ("user_id", BAD)
    assert "null or empty id" in str(err.value)


def test_bad_timestamp_in_the_middle_of_a_csv_log_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cols = _columns()
    stamps = cols["timestamp"].astype(str).astype(object)
    stamps[BAD] = "yesterday"
    path = tmp_path / "logs.csv"
    lines = ["user_id,item_id,timestamp"]
    lines += [
        f"{u},{i},{t}" for u, i, t in zip(cols["user_id"], cols["item_id"], stamps, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    assert main(["data", "info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"slimrank: error: {path}:{BAD + 2}, column 'timestamp', row {BAD}: "
        "not a unix time or ISO-8601 date-time: 'yesterday'"
    )


def test_duplicate_row_far_from_its_twin(tmp_path: Path) -> None:
    cols = _columns()
    for name in cols:
        cols[name][BAD] = cols[name][17]
    with pytest.raises(DataError) as err:
        load_logs(_parquet(tmp_path / "logs.parquet", cols))
    assert err.value.row == BAD and "as row 17" in str(err.value)


def test_a_logs_directory_with_a_bad_feature_row(tmp_path: Path) -> None:
    """A world-style directory: the item table names an item no interaction has."""
    cols = _columns()
    _parquet(tmp_path / "interactions.parquet", cols)
    items = np.unique(cols["item_id"])
    ids = items.copy()
    ids[len(ids) // 2] = 10**9
    _parquet(tmp_path / "items.parquet", {"item_id": ids, "year": np.ones(len(ids))})
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path))
    assert err.value.path == str(tmp_path / "items.parquet")
    assert (err.value.column, err.value.row) == ("item_id", len(ids) // 2)


CSV_ROWS = 100_000
CSV_BAD = 61_234  # data row; the file's line is CSV_BAD + 2 (1-based, after the header)


def _csv_lines() -> list[bytes]:
    cols = _columns()
    lines = [b"user_id,item_id,timestamp"]
    lines += [
        f"{u},{i},{t}".encode()
        for u, i, t in zip(
            cols["user_id"][:CSV_ROWS],
            cols["item_id"][:CSV_ROWS],
            cols["timestamp"][:CSV_ROWS],
            strict=True,
        )
    ]
    return lines


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (b"5,17,1600000000,extra", "Expected 3 fields in line"),
        (b'5,"17,1600000000', "EOF inside string"),
        (b"5,\xff\xfe,1600000000", "not UTF-8"),
        (b"5,17", "a missing value"),
    ],
    ids=["extra field", "unclosed quote", "not utf-8", "too few fields"],
)
def test_a_malformed_csv_line_in_the_middle_is_named_by_line_and_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: bytes, says: str
) -> None:
    lines = _csv_lines()
    lines[CSV_BAD + 1] = bad  # lines[0] is the header
    path = tmp_path / "logs.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as err:
        load_logs(path)
    assert (err.value.path, err.value.line, err.value.row) == (str(path), CSV_BAD + 2, CSV_BAD)
    assert says in str(err.value)
    assert main(["data", "info", str(path)]) == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith(f"slimrank: error: {path}:{CSV_BAD + 2}, ") and "\n" not in out
