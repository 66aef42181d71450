"""Loaders: CSV / Parquet logs with their errors, RecBole atomic files, the ml-100k fetch."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slimrank.cli import main
from slimrank.data.dataset import load_dataset
from slimrank.data.fetch import extract_movielens, fetch_movielens_100k, is_fetched
from slimrank.data.info import dataset_summary
from slimrank.data.logs import load_logs
from slimrank.data.movielens import load_atomic_dataset
from slimrank.data.titles import read_titles
from slimrank.errors import DataError, IntegrityError

LOGS_CSV = """user_id,item_id,timestamp,rating
u1,i1,100,5
u2,i1,2020-01-01T00:00:00Z,3
u1,i2,2020-01-01,4
007,i3,200,1
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_logs_load(tmp_path: Path) -> None:
    ds = load_logs(_write(tmp_path / "shop.csv", LOGS_CSV))
    assert ds.name == "shop"
    assert list(ds.users.ids) == ["u1", "u2", "007"]  # leading zeros kept: ids are strings
    assert list(ds.items.ids) == ["i1", "i2", "i3"]
    np.testing.assert_array_equal(ds.interactions.user, [0, 1, 0, 2])
    np.testing.assert_array_equal(ds.interactions.item, [0, 0, 1, 2])
    np.testing.assert_array_equal(ds.interactions.rating, [5, 3, 4, 1])
    np.testing.assert_array_equal(ds.interactions.timestamp, [100, 1577836800, 1577836800, 200])
    assert ds.user_features.n_rows == 3 and ds.user_features.names == []


def test_parquet_logs_without_rating_and_with_features(tmp_path: Path) -> None:
    logs = pd.DataFrame(
        {
            "user_id": [10, 20, 10],
            "item_id": ["a", "b", "b"],
            "timestamp": pd.to_datetime(["2021-01-01", "2021-01-02", "2021-01-03"], utc=True),
        }
    )
    logs.to_parquet(tmp_path / "logs.parquet")
    items = pd.DataFrame({"item_id": ["b", "a"], "price": [2.5, 1.0], "tags": [["x"], ["x", "y"]]})
    items.to_parquet(tmp_path / "items.parquet")
    ds = load_logs(tmp_path / "logs.parquet", item_features=tmp_path / "items.parquet")
    np.testing.assert_array_equal(ds.interactions.rating, [1, 1, 1])
    assert ds.interactions.timestamp[0] == 1609459200
    assert list(ds.users.ids) == ["10", "20"]
    # Feature rows are aligned to the dense item index ("a" is 0, "b" is 1).
    np.testing.assert_array_equal(ds.item_features.numeric["price"], [1.0, 2.5])
    assert ds.item_features.vocab["tags"] == ["x", "y"]
    np.testing.assert_array_equal(ds.item_features.multi_hot["tags"], [[1, 1], [1, 0]])


def test_csv_feature_file_types(tmp_path: Path) -> None:
    logs = _write(tmp_path / "l.csv", LOGS_CSV)
    users = _write(tmp_path / "u.csv", "user_id,age,segment\nu2,31,gold\n007,,\n")
    ds = load_logs(logs, user_features=users)
    feats = ds.user_features
    np.testing.assert_array_equal(feats.numeric["age"], [31, 31, 31])  # median fill
    np.testing.assert_array_equal(feats.numeric["age_missing"], [1, 0, 1])
    np.testing.assert_array_equal(feats.categorical["segment"], [0, 1, 0])


@pytest.mark.parametrize(
    ("text", "column", "row", "message"),
    [
        ("user_id,timestamp\nu1,1\n", "item_id", None, "missing column"),
        ("user_id,item_id,timestamp\nu1,i1,1\nu2,i1,yesterday\n", "timestamp", 1, "unix time"),
        ("user_id,item_id,timestamp\nu1,i1,1\n,i2,2\n", "user_id", 1, "null"),
        ("user_id,item_id,timestamp\nu1,i1,1\nu1,,2\n", "item_id", 1, "null"),
        ("user_id,item_id,timestamp,rating\nu1,i1,1,4\nu1,i2,2,good\n", "rating", 1, "number"),
        ("user_id,item_id,timestamp\nu1,i1,1\nu2,i1,1\nu1,i1,1\n", "user_id", 2, "duplicate"),
        ("user_id,item_id,timestamp\nu1,i1,1600000000000\n", "timestamp", 0, "milliseconds"),
        ("user_id,item_id,timestamp\nu1,i1,100000000000\n", "timestamp", 0, "milliseconds"),
        ("user_id,item_id,timestamp\nu1,i1,0\nu2,i1,-1\n", "timestamp", 1, ": -1 is before 1970"),
        ("user_id,item_id,timestamp\nu1,i1,-1600000000000\n", "timestamp", 0, "before 1970"),
        ("user_id,item_id,timestamp\nu1,i1,5\nu1,i2,1969-12-31\n", "timestamp", 1, "before 1970"),
        ("user_id,item_id,timestamp\nu1,i1,1\n  ,i2,2\n", "user_id", 1, "null or empty"),
        ("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,01/02/2020\n", "timestamp", 1, "ISO-8601"),
    ],
)
def test_bad_csv_logs_name_file_column_row_and_line(
    tmp_path: Path, text: str, column: str, row: int | None, message: str
) -> None:
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError, match=message) as info:
        load_logs(path)
    err = info.value
    assert err.path == str(path)
    assert err.column == column
    assert err.row == row
    assert err.line == (None if row is None else row + 2)
    assert str(path) in str(err)


@pytest.mark.parametrize(
    ("name", "text", "column"),
    [
        ("logs.csv", "user_id,item_id,timestamp,user_id\nu1,i1,1,u9\n", "user_id"),
        ("logs.tsv", "user_id\titem_id\ttimestamp\ttimestamp\nu1\ti1\t1\t2\n", "timestamp"),
    ],
)
def test_a_repeated_column_name_is_refused_not_guessed(
    tmp_path: Path, name: str, text: str, column: str
) -> None:
    """pandas would read the second copy as ``user_id.1`` and keep the first without a word."""
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match="more than once") as info:
        load_logs(path)
    assert (info.value.path, info.value.column, info.value.line) == (str(path), column, 1)
    users = _write(tmp_path / "users.csv", "user_id,age,age\nu1,30,31\n")
    with pytest.raises(DataError, match="more than once") as info:
        load_logs(_write(tmp_path / "l.csv", LOGS_CSV), user_features=users)
    assert (info.value.path, info.value.column) == (str(users), "age")


def test_names_that_only_look_repeated_are_read(tmp_path: Path) -> None:
    """A real ``user_id.1`` column, or a quoted name holding a comma, is not a repeat."""
    text = 'user_id,item_id,timestamp,user_id.1,"a,b"\nu1,i1,1,x,y\n'
    ds = load_logs(_write(tmp_path / "logs.csv", text))
    assert list(ds.users.ids) == ["u1"] and list(ds.items.ids) == ["i1"]


def test_bad_parquet_logs_have_row_but_no_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"user_id": ["a", None], "item_id": ["x", "y"], "timestamp": [1, 2]}).to_parquet(
        path
    )
    with pytest.raises(DataError) as info:
        load_logs(path)
    assert (info.value.column, info.value.row, info.value.line) == ("user_id", 1, None)


@pytest.mark.parametrize(
    ("features", "row", "message"),
    [
        ("user_id,age\nu1,30\nghost,40\n", 1, "does not appear"),
        ("user_id,age\nu1,30\nu1,31\n", 1, "duplicate id"),
        ("user_id,age\nu1,30\n,31\n", 1, "null"),
    ],
)
def test_bad_feature_rows(tmp_path: Path, features: str, row: int, message: str) -> None:
    logs = _write(tmp_path / "l.csv", LOGS_CSV)
    users = _write(tmp_path / "users.csv", features)
    with pytest.raises(DataError, match=message) as info:
        load_logs(logs, user_features=users)
    assert info.value.path == str(users)
    assert (info.value.column, info.value.row, info.value.line) == ("user_id", row, row + 2)


def test_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_logs(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="unknown file type"):
        load_logs(_write(tmp_path / "logs.json", "{}"))
    with pytest.raises(DataError, match="no interactions"):
        load_logs(_write(tmp_path / "empty.csv", "user_id,item_id,timestamp\n"))


def test_text_columns_without_an_item_table_are_an_error(tmp_path: Path) -> None:
    """Asking for text columns with no item table to read them from raises, not ignores."""
    with pytest.raises(DataError, match="text columns title"):
        load_logs(_write(tmp_path / "l.csv", LOGS_CSV), text_columns=("title",))


def test_iso_dates_read_month_before_day_and_honour_their_zone(tmp_path: Path) -> None:
    """``2020-01-02`` is the 2nd of January (not the 1st of February), and an offset moves
    the instant to UTC."""
    text = "user_id,item_id,timestamp\nu1,i1,2020-01-02\nu1,i2,2020-03-04T05:06:07+02:00\n"
    ds = load_logs(_write(tmp_path / "l.csv", text))
    want = [pd.Timestamp("2020-01-02", tz="UTC"), pd.Timestamp("2020-03-04T03:06:07", tz="UTC")]
    np.testing.assert_array_equal(ds.interactions.timestamp, [int(t.timestamp()) for t in want])


def test_text_columns_follow_their_item_ids(tmp_path: Path) -> None:
    """Text cells land on their own item (table order differs from the log's first-seen
    order), and an item without a row gets an empty text."""
    logs = _write(tmp_path / "l.csv", "user_id,item_id,timestamp\nu1,a,1\nu1,b,2\nu2,c,3\n")
    items = _write(tmp_path / "items.csv", "item_id,title,price\nc,Cee,3\na,Ay,1\n")
    ds = load_logs(logs, item_features=items, text_columns=("title",))
    assert list(ds.items.ids) == ["a", "b", "c"]
    assert ds.item_text is not None and list(ds.item_text["title"]) == ["Ay", "", "Cee"]
    assert "title" not in ds.item_features.names


def test_summary_counts_distinct_pairs_once(tmp_path: Path) -> None:
    """``data info``'s pairs and density count a (user, item) seen twice once."""
    text = "user_id,item_id,timestamp\nu1,i1,1\nu1,i1,2\nu2,i1,3\nu2,i2,4\n"
    summary = dataset_summary(load_logs(_write(tmp_path / "l.csv", text)))
    assert summary["interactions"] == 4
    assert summary["distinct user-item pairs"] == 3
    assert summary["density"] == 3 / 4


def test_cli_reports_data_errors_with_exit_2(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path / "bad.csv", "user_id,item_id,timestamp\nu1,i1,soon\n")
    assert main(["data", "info", str(path)]) == 2
    assert f"{path}:2" in capsys.readouterr().err
    good = _write(tmp_path / "good.csv", LOGS_CSV)
    assert main(["data", "info", str(good)]) == 0
    assert "interactions" in capsys.readouterr().out


# A tiny dataset in ml-100k's atomic schema (header types as in RecBole's files).
INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t5\t881250950\n"
)
USER = (
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "186\t39\tF\texecutive\t00000\n196\t49\tM\twriter\t55105\n999\t20\tM\tnone\t1\n"
)
ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "242\tKolya\t1996\tComedy\n302\tL.A. Confidential\tunkonwn\tCrime Film-Noir Mystery\n"
)


def _atomic_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "atomic"
    directory.mkdir()
    for suffix, text in (("inter", INTER), ("user", USER), ("item", ITEM)):
        _write(directory / f"ml-100k.{suffix}", text)
    return directory


def test_atomic_dataset_features(tmp_path: Path) -> None:
    ds = load_atomic_dataset(_atomic_dir(tmp_path), "ml-100k", name="tiny")
    assert list(ds.users.ids) == ["196", "186"]  # user 999 never interacts: dropped
    assert list(ds.items.ids) == ["242", "302"]
    np.testing.assert_array_equal(ds.interactions.rating, [3, 3, 5])
    np.testing.assert_array_equal(ds.interactions.timestamp, [881250949, 891717742, 881250950])
    uf = ds.user_features
    assert [uf.vocab["age_bucket"][c] for c in uf.categorical["age_bucket"]] == ["45-49", "35-44"]
    assert [uf.vocab["gender"][c] for c in uf.categorical["gender"]] == ["M", "F"]
    assert [uf.vocab["occupation"][c] for c in uf.categorical["occupation"]] == [
        "writer",
        "executive",
    ]
    itf = ds.item_features
    assert itf.vocab["genre"] == ["Comedy", "Crime", "Film-Noir", "Mystery"]
    np.testing.assert_array_equal(itf.multi_hot["genre"], [[1, 0, 0, 0], [0, 1, 1, 1]])
    np.testing.assert_array_equal(itf.numeric["release_year"], [1996, 1996])  # median fill
    np.testing.assert_array_equal(itf.numeric["release_year_missing"], [0, 1])
    assert list(ds.item_titles) == ["Kolya", "L.A. Confidential"]


def test_read_titles_gives_the_datasets_titles_without_pandas(tmp_path: Path) -> None:
    directory = _atomic_dir(tmp_path)
    ds = load_atomic_dataset(directory, "ml-100k", name="tiny")
    titles = read_titles(directory / "ml-100k.item")
    assert titles == dict(zip(ds.items.ids, ds.item_titles, strict=True))
    _write(directory / "no-title.item", "item_id:token\tclass:token_seq\n242\tComedy\n")
    with pytest.raises(DataError, match="movie_title"):
        read_titles(directory / "no-title.item")


def test_load_dataset_reads_a_recbole_directory(tmp_path: Path) -> None:
    directory = _atomic_dir(tmp_path)
    ds = load_dataset(str(directory))
    assert ds.name == "ml-100k" and len(ds.interactions) == 3
    with pytest.raises(DataError, match=r"one \*\.inter"):
        load_dataset(str(tmp_path))


def test_atomic_errors(tmp_path: Path) -> None:
    directory = _atomic_dir(tmp_path)
    _write(directory / "ml-100k.inter", INTER.replace("\t5\t", "\tfive\t"))
    with pytest.raises(DataError, match="not a number") as info:
        load_atomic_dataset(directory, "ml-100k", name="tiny")
    assert (info.value.column, info.value.row, info.value.line) == ("rating", 2, 4)
    _write(directory / "ml-100k.inter", INTER.replace("rating:float", "rating"))
    with pytest.raises(DataError, match="name:type"):
        load_atomic_dataset(directory, "ml-100k", name="tiny")


def test_atomic_dataset_without_rating_rates_every_interaction_one(tmp_path: Path) -> None:
    """An ``.inter`` file with no rating column gives ratings of 1.0, as logs do."""
    directory = _atomic_dir(tmp_path)
    lines = [line.split("\t") for line in INTER.splitlines()]
    text = "".join("\t".join([u, i, t]) + "\n" for u, i, _, t in lines)
    _write(directory / "ml-100k.inter", text)
    ds = load_atomic_dataset(directory, "ml-100k", name="tiny")
    np.testing.assert_array_equal(ds.interactions.rating, [1, 1, 1])
    np.testing.assert_array_equal(ds.interactions.timestamp, [881250949, 891717742, 881250950])


def test_atomic_age_buckets_keep_the_age_group_order(tmp_path: Path) -> None:
    """Age-bucket codes follow MovieLens-1M's groups youngest first, not the labels' sort."""
    ds = load_atomic_dataset(_atomic_dir(tmp_path), "ml-100k", name="tiny")
    vocab = ds.user_features.vocab["age_bucket"]
    assert vocab == ["[UNK]", "<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
    np.testing.assert_array_equal(ds.user_features.categorical["age_bucket"], [5, 4])


@pytest.mark.parametrize(
    ("suffix", "old", "new", "column", "row", "message"),
    [
        ("inter", "186\t302", "\t302", "user_id", 1, "empty id"),
        ("inter", "\t242\t", "\t\t", "item_id", 0, "empty id"),
        ("item", "302\tL.A.", "242\tL.A.", "item_id", 1, "duplicate id"),
        ("user", "196\t49", "186\t49", "user_id", 1, "duplicate id"),
    ],
)
def test_atomic_bad_ids_name_file_column_and_line(
    tmp_path: Path, suffix: str, old: str, new: str, column: str, row: int, message: str
) -> None:
    """Empty ids in ``.inter`` and repeated ids in ``.user``/``.item`` are errors at their line."""
    directory = _atomic_dir(tmp_path)
    path = directory / f"ml-100k.{suffix}"
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1
    _write(path, text.replace(old, new))
    with pytest.raises(DataError, match=message) as info:
        load_atomic_dataset(directory, "ml-100k", name="tiny")
    err = info.value
    assert (err.path, err.column, err.row, err.line) == (str(path), column, row, row + 2)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("user_id:token\titem_id:token\trating:float\tuser_id:float", "twice"),
        ("user_id:token\titem_id:token\trating:number\ttimestamp:float", "name:type"),
    ],
)
def test_atomic_bad_headers(tmp_path: Path, header: str, message: str) -> None:
    """A repeated column or an unknown type in the header is a DataError at line 1."""
    directory = _atomic_dir(tmp_path)
    path = _write(directory / "ml-100k.inter", header + INTER[INTER.index("\n") :])
    with pytest.raises(DataError, match=message) as info:
        load_atomic_dataset(directory, "ml-100k", name="tiny")
    assert (info.value.path, info.value.line) == (str(path), 1)


def test_read_titles_skips_rows_too_short_for_the_title(tmp_path: Path) -> None:
    """A row without a title field is left out rather than raising IndexError."""
    path = _write(tmp_path / "t.item", "item_id:token\tmovie_title:token_seq\n1\tA\n2\n3\tC\n")
    assert read_titles(path) == {"1": "A", "3": "C"}


def _fake_wheel(path: Path, with_files: bool = True) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
        if with_files:
            for suffix, text in (("inter", INTER), ("user", USER), ("item", ITEM)):
                zf.writestr(f"recbole/dataset_example/ml-100k/ml-100k.{suffix}", text)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_extract_checks_sha256_and_writes_nothing_on_mismatch(tmp_path: Path) -> None:
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    digest = _fake_wheel(wheel)
    home = tmp_path / "home"
    target = home / "movielens-100k"
    with pytest.raises(IntegrityError, match="sha256"):
        extract_movielens(wheel, target, expected_sha256="0" * 64)
    assert not target.exists()
    extract_movielens(wheel, target, expected_sha256=digest)
    assert is_fetched(home)
    assert (target / "ml-100k.inter").read_text(encoding="utf-8") == INTER
    assert sorted(p.name for p in home.iterdir()) == ["movielens-100k"]  # no staging left


def test_extract_missing_member_leaves_nothing(tmp_path: Path) -> None:
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    digest = _fake_wheel(wheel, with_files=False)
    home = tmp_path / "home"
    with pytest.raises(IntegrityError, match="ml-100k"):
        extract_movielens(wheel, home / "movielens-100k", expected_sha256=digest)
    assert list(home.iterdir()) == []


def test_extract_replaces_a_partial_target_directory(tmp_path: Path) -> None:
    """A target left by an older layout (some files, a stray one) is replaced as a whole."""
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    digest = _fake_wheel(wheel)
    target = tmp_path / "home" / "movielens-100k"
    target.mkdir(parents=True)
    _write(target / "ml-100k.inter", "stale")
    _write(target / "old-layout.txt", "stray")
    extract_movielens(wheel, target, expected_sha256=digest)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["ml-100k.inter", "ml-100k.user", "ml-100k.item"]
    )
    assert (target / "ml-100k.inter").read_text(encoding="utf-8") == INTER


def test_fetch_is_a_no_op_when_cached_and_load_uses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("SLIMRANK_DATA", str(home))
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    extract_movielens(wheel, home / "movielens-100k", expected_sha256=_fake_wheel(wheel))
    directory, fetched = fetch_movielens_100k()  # would need the network if not cached
    assert (directory, fetched) == (home / "movielens-100k", False)
    ds = load_dataset("movielens-100k")
    assert ds.name == "movielens-100k" and len(ds.interactions) == 3
