"""Bad input at catalog scale: one bad row in the middle of the 1M world's 20M-row log.

Copies the world's ``interactions.parquet`` once as Parquet and once as CSV, each with one bad
value at a row in the middle, and runs ``slimrank data info`` on each copy in its own process,
as a customer would. Each case passes when the CLI exits with status 2 and its message names
the file, the column and the row (and, for CSV, the line); the wall time and peak RSS of the
check are recorded beside it. The tests check the same at 200k rows
(``tests/test_data_scale_errors.py``); this runs it at the size ``make bench-scale`` reads.

    .venv/bin/python bench/scale_bad_rows.py bench/.cache/scale/world-1000000u-1000000i-20

Writes ``bench/results/scale_bad_rows.{json,md}``; the copies go to a temporary directory
(about 0.7 GB), removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad value planted in a copy of the log."""

    name: str
    fmt: str  # "parquet" or "csv"
    column: str
    value: object  # what the cell at ``row`` becomes (None: null)
    expected: str  # the CLI's message, {path} and {row} / {line} filled in


CASES = (
    Case(
        "NaN timestamp",
        "parquet",
        "timestamp",
        float("nan"),
        "column 'timestamp', row {row}",
    ),
    Case("null user id", "parquet", "user_id", None, "column 'user_id', row {row}"),
    Case(
        "timestamp 'yesterday'",
        "csv",
        "timestamp",
        "yesterday",
        "{path}:{line}, column 'timestamp', row {row}",
    ),
    Case("empty item id", "csv", "item_id", "", "{path}:{line}, column 'item_id', row {row}"),
)


def planted(table: pa.Table, case: Case, row: int) -> pa.Table:
    """Return ``table`` with ``case.value`` at ``row`` of ``case.column`` (the column's type
    widened to what the value needs: float for NaN, string for text)."""
    col = table.column(case.column).to_numpy()
    if case.value is None:
        mask = np.zeros(len(col), dtype=bool)
        mask[row] = True
        arr = pa.array(col, mask=mask)
    elif isinstance(case.value, float):
        values = col.astype(np.float64)
        values[row] = case.value
        arr = pa.array(values)
    else:
        values = col.astype(str).astype(object)
        values[row] = case.value
        arr = pa.array(values, type=pa.string())
    return table.set_column(table.schema.get_field_index(case.column), case.column, arr)


def run_case(table: pa.Table, case: Case, row: int, tmp: Path) -> dict[str, object]:
    """Write the planted copy, run ``slimrank data info`` on it, check the message."""
    path = tmp / f"interactions-{case.fmt}.{case.fmt}"
    t0 = time.perf_counter()
    bad = planted(table, case, row)
    if case.fmt == "parquet":
        pq.write_table(bad, path, row_group_size=1 << 20)
    else:
        pacsv.write_csv(bad, path, pacsv.WriteOptions(quoting_style="none"))
    written = time.perf_counter() - t0
    del bad
    stderr = tmp / "stderr.txt"
    t0 = time.perf_counter()
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slimrank.cli", "data", "info", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU and peak RSS
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    text = stderr.read_text().strip()
    message = text.splitlines()[-1] if text else ""
    expected = case.expected.format(path=path, row=row, line=row + 2)
    ok = code == 2 and expected in message and str(path) in message
    path.unlink()
    return {
        "case": case.name,
        "format": case.fmt,
        "row": row,
        "exit": code,
        "message": message.replace(str(path), path.name),
        "expected": expected.replace(str(path), path.name),
        "passed": ok,
        "check_wall_s": round(wall, 1),
        "check_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "check_peak_rss_mib": round(usage.ru_maxrss / 1024),
        "write_s": round(written, 1),
    }


def report(rows: list[dict[str, object]], n_rows: int, world: Path) -> str:
    lines = [
        "# Bad input at scale: one bad row in the middle of a 20M-row log",
        "",
        f"`bench/scale_bad_rows.py {world}`: the world's `interactions.parquet` "
        f"({n_rows:,} rows) copied with one bad value, then `slimrank data info COPY` in its own "
        f"process. Load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| case | format | row | exit | message (last line of stderr) | names it | wall s | "
        "CPU s | peak RSS MiB |",
        "|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['format']} | {r['row']:,} | {r['exit']} | `{r['message']}` | "
            f"{'yes' if r['passed'] else 'NO'} | {r['check_wall_s']} | {r['check_cpu_s']} | "
            f"{r['check_peak_rss_mib']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("world", type=Path, help="a world directory (interactions.parquet)")
    parser.add_argument("--row", type=int, default=0, help="the bad row (default: the middle)")
    parser.add_argument("--no-save", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    source = args.world / "interactions.parquet"
    if not source.is_file():
        parser.error(f"{source}: no such file")
    table = pq.read_table(source)
    row = args.row or table.num_rows * 5 // 9  # past the middle, off any chunk boundary
    if not 0 <= row < table.num_rows:
        parser.error(f"--row {row}: the log has {table.num_rows} rows")
    rows = []
    with tempfile.TemporaryDirectory(prefix="slimrank-bad-rows-") as tmp:
        for case in CASES:
            result = run_case(table, case, row, Path(tmp))
            print(json.dumps(result), flush=True)
            rows.append(result)
    text = report(rows, table.num_rows, args.world)
    print(text)
    if not args.no_save:
        (RESULTS / "scale_bad_rows.json").write_text(json.dumps(rows, indent=1) + "\n")
        (RESULTS / "scale_bad_rows.md").write_text(text)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
