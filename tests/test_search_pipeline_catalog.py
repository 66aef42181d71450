"""A customer's item table: its text columns feed the search catalog, not the ranker."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from slimrank.data.logs import load_logs
from slimrank.errors import DataError
from slimrank.pipeline.config import DataConfig, PipelineConfig
from slimrank.pipeline.steps import catalog_step, data_step
from slimrank.search.build import TextIndexConfig


def write_tables(tmp_path: Path) -> tuple[Path, Path, Path]:
    logs = tmp_path / "logs.csv"
    rows = ["user_id,item_id,timestamp"]
    for u in range(6):
        for i in range(4):
            rows.append(f"u{u},i{(u + i) % 5},{1_600_000_000 + 10 * u + i}")
    logs.write_text("\n".join(rows) + "\n")
    items = tmp_path / "items.csv"
    items.write_text(
        "item_id,title,blurb,brand,price\n"
        "i0,Red Kettle,boils water fast,acme,20\n"
        "i1,Blue Teapot,,acme,35\n"
        "i2,Steel Kettle,quiet boil,zenith,50\n"
        "i3,Green Mug,,zenith,8\n"
        "i4,Travel Mug,keeps tea warm,acme,15\n"
    )
    users = tmp_path / "users.csv"
    users.write_text(
        "user_id,plan\n" + "".join(f"u{u},{'pro' if u % 2 else 'free'}\n" for u in range(6))
    )
    return logs, users, items


def test_text_columns_leave_the_feature_table_for_item_text(tmp_path: Path) -> None:
    logs, users, items = write_tables(tmp_path)
    dataset = load_logs(logs, users, items, text_columns=("title", "blurb"))
    assert set(dataset.item_features.names) == {"brand", "price", "price_missing"}
    assert dataset.item_text is not None
    by_id = dict(zip(dataset.items.ids, dataset.item_text["blurb"], strict=True))
    assert by_id == {
        "i0": "boils water fast",
        "i1": "",
        "i2": "quiet boil",
        "i3": "",
        "i4": "keeps tea warm",
    }
    with pytest.raises(DataError, match=r"items\.csv.*colour|colour.*items\.csv"):
        load_logs(logs, users, items, text_columns=("colour",))


def test_the_pipeline_catalog_indexes_the_item_tables_text(tmp_path: Path) -> None:
    logs, users, items = write_tables(tmp_path)
    config = DataConfig(
        source=str(logs),
        user_features=str(users),
        item_features=str(items),
        text_columns=("title", "blurb"),
    )
    data = data_step(config)
    catalog = catalog_step(config, TextIndexConfig(), data).catalog
    ids = [str(i) for i in data.item_ids]
    assert catalog.fields == ("title", "blurb", "brand")
    assert [ids[r] for r in np.flatnonzero(catalog.text.score("kettle "))] == sorted(
        ["i0", "i2"], key=ids.index
    )
    assert [ids[r] for r in np.flatnonzero(catalog.text.score("tea "))] == ["i4"]
    assert [ids[r] for r in np.flatnonzero(catalog.text.score("zenith "))] == sorted(
        ["i2", "i3"], key=ids.index
    )
    assert dict(zip(ids, catalog.titles, strict=True))["i1"] == "Blue Teapot"
    assert catalog.attributes.names == ["brand", "price"]
    assert "title" not in data.item_features.names  # the ranker never sees the text
    # Items the source now lists in another order than the data step's: refused, since the
    # catalog's rows must be the data step's items (a title on the wrong item otherwise).
    shuffled = dataclasses.replace(data, item_ids=np.asarray(data.item_ids)[::-1])
    with pytest.raises(ValueError, match="items differ from the data step's"):
        catalog_step(config, TextIndexConfig(), shuffled)


def test_unset_feature_tables_keep_the_data_steps_digest() -> None:
    plain = DataConfig(source="movielens-100k").to_dict()
    assert "item_features" not in plain and "text_columns" not in plain
    assert DataConfig.from_dict(plain) == DataConfig(source="movielens-100k")
    config = PipelineConfig.from_dict(
        {"data": {"source": "x.csv", "item_features": "i.csv", "text_columns": ["title"]}}
    )
    assert config.data.text_columns == ("title",)
    with pytest.raises(ValueError, match="text_columns"):
        DataConfig(source="x.csv", text_columns=("title",))
