"""Item titles from a RecBole ``.item`` file, read with the csv module (no pandas).

``slimrank query`` and the demo print titles next to item ids; they run in the slim install,
which has no pandas, so they read the one column they need here instead of loading the dataset.
"""

from __future__ import annotations

import csv
from pathlib import Path

from slimrank.errors import DataError

TITLE_COLUMN = "movie_title"
ID_COLUMN = "item_id"


def read_titles(path: str | Path) -> dict[str, str]:
    """Return ``{item id: title}`` of an atomic ``.item`` file (tab-separated, typed header).

    Parsed as :func:`slimrank.data.atomic.read_atomic` parses it (no quoting, utf-8), so the
    titles equal ``load_dataset(...).item_titles``. ``DataError`` if the file or a column is
    missing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [field.partition(":")[0] for field in next(rows, [])]
        for name in (ID_COLUMN, TITLE_COLUMN):
            if name not in header:
                raise DataError(
                    f"missing column (have {', '.join(header)})", path=path, column=name
                )
        item, title = header.index(ID_COLUMN), header.index(TITLE_COLUMN)
        return {row[item]: row[title] for row in rows if len(row) > max(item, title)}
