"""Input files are keyed by content: a log rewritten in place re-runs the pipeline from data."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from slimrank.bundle.checksums import sha256_file
from slimrank.pipeline.artifacts import DataArtifact
from slimrank.pipeline.config import PipelineConfig, load_config
from slimrank.pipeline.inputs import InputDigests
from slimrank.pipeline.run import STEPS, cached_step_paths, run_pipeline
from slimrank.pipeline.synthetic import synthetic_dataset


def _write_logs(path: Path, seed: int, rng_swap: int | None = None) -> None:
    """Write tiny.toml's synthetic catalog as a logs CSV; ``rng_swap`` moves some items.

    Ids are zero-padded, so moving rows to other items keeps the file's size.
    """
    data = synthetic_dataset(50, 60, 15, seed)
    inter = data.interactions
    item = inter.item.copy()
    if rng_swap is not None:
        rng = np.random.default_rng(rng_swap)
        for row in rng.choice(len(item), 60, replace=False):
            has = set(item[inter.user == inter.user[row]].tolist())
            item[row] = rng.choice([i for i in range(60) if i not in has])
    lines = ["user_id,item_id,timestamp,rating"]
    lines += [
        f"u{u:03d},i{i:03d},{t},{r:.0f}"
        for u, i, t, r in zip(inter.user, item, inter.timestamp, inter.rating, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


def _run(config: PipelineConfig) -> dict:
    outputs = {}

    def hook(name, output, seconds) -> None:
        if output is not None:
            outputs[name] = output

    run_pipeline(config, hook)
    assert list(outputs) == list(STEPS)
    return outputs


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    messages = [r.getMessage() for r in caplog.records]
    caplog.clear()
    return messages


@pytest.mark.slow
def test_a_log_rewritten_in_place_reruns_data_and_every_later_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="slimrank.pipeline")
    logs = tmp_path / "logs.csv"
    _write_logs(logs, seed=0)
    tiny = load_config("tiny")
    config = dataclasses.replace(
        tiny,
        cache_dir=str(tmp_path / "cache"),
        data=dataclasses.replace(tiny.data, source=str(logs)),
    )
    first = _run(config)
    assert not any(o.cached for o in first.values())
    _messages(caplog)

    # 1. Same content, new mtime (touch, or a copy of the same file): still all cached.
    os.utime(logs, ns=(1, 2))
    again = _run(config)
    assert all(o.cached for o in again.values())
    assert {n: o.path for n, o in again.items()} == {n: o.path for n, o in first.items()}
    assert not any("changed" in m for m in _messages(caplog))

    # 2. Rewritten in place with other rows (a different size).
    _write_logs(logs, seed=1)
    second = _run(config)
    assert f"step data: input {logs.resolve()} changed, re-running" in _messages(caplog)
    for name in STEPS:
        assert not second[name].cached, name
        assert second[name].digest != first[name].digest, name
    old = DataArtifact.load(first["data"].path).split
    new = DataArtifact.load(second["data"].path).split
    assert not np.array_equal(old.train.item, new.train.item)
    # Found without running (as bench scripts find a run's outputs): keyed by the content too.
    assert cached_step_paths(config) == {n: o.path for n, o in second.items()}
    model = "model/model.safetensors"
    assert sha256_file(first["two_tower"].path / model) != sha256_file(
        second["two_tower"].path / model
    )

    # 3. The same size and the mtime put back: only the content's hash can tell.
    st = os.stat(logs)
    _write_logs(logs, seed=1, rng_swap=7)
    os.utime(logs, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(logs).st_size == st.st_size
    assert os.stat(logs).st_mtime_ns == st.st_mtime_ns
    third = _run(config)
    assert f"step data: input {logs.resolve()} changed, re-running" in _messages(caplog)
    for name in STEPS:
        assert not third[name].cached, name
        assert third[name].digest not in (first[name].digest, second[name].digest), name
    moved = DataArtifact.load(third["data"].path).split
    assert not np.array_equal(new.train.item, moved.train.item)

    # 4. Back to the first content: its outputs are still in the cache, and reused.
    _write_logs(logs, seed=0)
    back = _run(config)
    assert all(o.cached for o in back.values())
    assert {n: o.digest for n, o in back.items()} == {n: o.digest for n, o in first.items()}
    assert any("changed, its output for this content is cached" in m for m in _messages(caplog))


def test_input_digests_hash_only_when_stat_changes(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("abc\n")
    store = InputDigests(tmp_path / "cache")
    (first,) = store.digest([path])
    assert first.sha256 == sha256_file(path) and not first.changed
    assert (tmp_path / "cache" / "inputs.json").is_file()
    # Unchanged stat: the stored hash is used (proved by planting a wrong one in the store).
    text = (tmp_path / "cache" / "inputs.json").read_text()
    (tmp_path / "cache" / "inputs.json").write_text(text.replace(first.sha256, "f" * 64))
    assert store.digest([path])[0].sha256 == "f" * 64
    # Same size, mtime restored: the change time differs, so the file is hashed again.
    st = os.stat(path)
    path.write_text("abd\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    (again,) = store.digest([path])
    assert again.sha256 == sha256_file(path) != first.sha256
    assert again.changed


def test_input_digests_key_a_file_by_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative name and the absolute path of one file are one record and one key, so
    ``--logs a.csv`` and ``--logs /abs/a.csv`` share the cached outputs."""
    path = tmp_path / "a.csv"
    path.write_text("abc\n")
    monkeypatch.chdir(tmp_path)
    store = InputDigests(tmp_path / "cache")
    (relative,) = store.digest(["a.csv"])
    (absolute,) = store.digest([path])
    assert relative == absolute
    assert relative.path == str(path.resolve()) and not relative.changed
    assert list(json.loads(store.store.read_text())) == [str(path.resolve())]


@pytest.mark.parametrize("stored", ['{"trunc', "[]", ""])
def test_an_unreadable_digest_store_hashes_again(tmp_path: Path, stored: str) -> None:
    """A store that is not a JSON object (cut short, another shape) is not trusted: the file
    is hashed again and the store rewritten, rather than the run failing."""
    path = tmp_path / "a.csv"
    path.write_text("abc\n")
    store = InputDigests(tmp_path / "cache")
    store.store.parent.mkdir()
    store.store.write_text(stored)
    (got,) = store.digest([path])
    assert got.sha256 == sha256_file(path) and not got.changed
    assert json.loads(store.store.read_text())[str(path.resolve())]["sha256"] == got.sha256
