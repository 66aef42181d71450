"""Digests, tree checks, manifests and version names of the bundle store."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimrank.bundle.checksums import (
    ALTERED,
    MISSING,
    NOT_A_FILE,
    RESIZED,
    TRUNCATED,
    UNEXPECTED,
    FileDigest,
    check_tree,
    digest_file,
    hash_tree,
    tree_digest,
)
from slimrank.bundle.manifest import (
    Manifest,
    check_name,
    diff_manifests,
    flat_metrics,
    manifest_from_dict,
    read_manifest,
)
from slimrank.bundle.versions import format_version, parse_version, utc_iso, version_key
from slimrank.errors import IntegrityError

WHEN = dt.datetime(2026, 11, 22, 14, 30, tzinfo=dt.UTC)


def _tree(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"hello")
    (tmp_path / "sub" / "b.txt").write_bytes(b"world!")
    return tmp_path


def test_digest_matches_hashlib(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 7)
    (tmp_path / "f").write_bytes(data)
    assert digest_file(tmp_path / "f") == FileDigest(len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, 1 << 20])
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 100_003])
def test_digest_in_any_chunk_size_matches_hashlib(tmp_path, chunk_bytes, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    expected = FileDigest(size, hashlib.sha256(data).hexdigest())
    assert digest_file(tmp_path / "f", chunk_bytes) == expected


def test_hash_tree_names_and_tree_digest(tmp_path):
    root = _tree(tmp_path)
    digests = hash_tree(root)
    assert sorted(digests) == ["a.bin", "sub/b.txt"]
    assert digests["sub/b.txt"].size == 6
    before = tree_digest(digests)
    (root / "sub" / "b.txt").write_bytes(b"World!")
    assert tree_digest(hash_tree(root)) != before
    assert sorted(hash_tree(root, exclude=["a.bin"])) == ["sub/b.txt"]


def test_hash_tree_refuses_symlinks(tmp_path):
    root = _tree(tmp_path)
    os.symlink(root / "a.bin", root / "link")
    with pytest.raises(ValueError, match="link"):
        hash_tree(root)


def test_check_tree_reports_every_kind(tmp_path):
    root = _tree(tmp_path)
    (root / "c").write_bytes(b"ccc")
    (root / "d").write_bytes(b"ddd")
    expected = hash_tree(root)
    assert check_tree(root, expected) == []
    (root / "a.bin").unlink()  # missing
    (root / "sub" / "b.txt").write_bytes(b"wor")  # truncated
    (root / "c").write_bytes(b"cccc")  # grown
    (root / "d").write_bytes(b"dxd")  # same size, other bytes
    (root / "extra").write_bytes(b"?")
    got = {p.name: p.kind for p in check_tree(root, expected)}
    assert got == {
        "a.bin": MISSING,
        "sub/b.txt": TRUNCATED,
        "c": RESIZED,
        "d": ALTERED,
        "extra": UNEXPECTED,
    }
    assert [p.name for p in check_tree(root, expected, exclude=["extra"])] == [
        "a.bin",
        "c",
        "d",
        "sub/b.txt",
    ]


def test_check_tree_refuses_a_link_or_directory_in_place_of_a_file(tmp_path):
    # A symlink to identical bytes would hash the same, but what it points at can change
    # after the check (or lie outside the bundle): only regular files pass.
    (tmp_path / "tree").mkdir()
    root = _tree(tmp_path / "tree")
    expected = hash_tree(root)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"hello")
    (root / "a.bin").unlink()
    os.symlink(outside, root / "a.bin")
    (root / "sub" / "b.txt").unlink()
    (root / "sub" / "b.txt").mkdir()
    got = {p.name: p.kind for p in check_tree(root, expected)}
    assert got == {"a.bin": NOT_A_FILE, "sub/b.txt": NOT_A_FILE}


def test_version_names_sort_by_sequence():
    names = [format_version(s, WHEN) for s in (2, 10, 1, 1_000_000)]
    assert names[0] == "v000002-20261122T143000Z"
    assert [version_key(n) for n in sorted(names, key=version_key)] == [1, 2, 10, 1_000_000]
    for bad in ("v12-20261122T143000Z", "v000001-20261399T143000Z", ".tmp-v000001", "CURRENT"):
        assert parse_version(bad) is None
    assert parse_version("v00001-20261122T143000Z") is None  # at least six digits
    # Names and created stamps are UTC, whole seconds, whatever zone the clock was read in.
    later = dt.datetime(2026, 11, 23, 1, 30, 0, 999_999, tzinfo=dt.timezone(dt.timedelta(hours=11)))
    assert format_version(4, later) == "v000004-20261122T143000Z"
    assert utc_iso(later) == "2026-11-22T14:30:00Z"
    with pytest.raises(ValueError):
        format_version(0, WHEN)


def _manifest(**kw) -> Manifest:
    base = dict(
        version=format_version(3, WHEN),
        created="2026-11-22T14:30:00Z",
        files={"ranker.onnx": FileDigest(10, "a" * 64), "ids.npy": FileDigest(3, "b" * 64)},
        parent="teacher-1",
        config={"keep": 3},
        metrics={"test": {"ndcg@10": 0.31, "recall@10": 0.2}, "latency_ms": 1.5},
        gate={"passed": True},
    )
    base.update(kw)
    return Manifest(**base)


def test_manifest_round_trip(tmp_path):
    m = _manifest()
    (tmp_path / "manifest.json").write_bytes(m.to_json())
    assert read_manifest(tmp_path / "manifest.json") == m
    assert m.total_bytes == 13


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_.]{0,8}(/[a-z][a-z0-9_]{0,5})?", fullmatch=True),
        st.tuples(st.integers(0, 2**40), st.binary(min_size=4, max_size=4)),
        max_size=6,
    )
)
def test_manifest_round_trip_property(entries):
    files = {
        n: FileDigest(size, hashlib.sha256(salt).hexdigest()) for n, (size, salt) in entries.items()
    }
    m = _manifest(files=files)
    assert manifest_from_dict(json.loads(m.to_json())) == m


def test_manifest_refuses_nan():
    with pytest.raises(ValueError):
        _manifest(metrics={"ndcg": float("nan")}).to_json()


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda d: d.update(format_version=2), "format_version"),
        (lambda d: d.pop("files"), "files"),
        (lambda d: d.update(version="latest"), "version"),
        (lambda d: d["files"].update({"x": {"size": -1, "sha256": "a" * 64}}), "x"),
        (lambda d: d["files"].update({"x": {"size": 1, "sha256": "zz"}}), "x"),
        (lambda d: d["files"].update({"x": {"size": 1, "sha256": "a" * 63}}), "x"),  # short
        (lambda d: d["files"].update({"x": {"size": 1, "sha256": "A" * 64}}), "x"),  # not lower
        (lambda d: d["files"].update({"x": {"size": 1, "sha256": "g" * 64}}), "x"),  # not hex
        (lambda d: d["files"].update({"../x": {"size": 1, "sha256": "a" * 64}}), r"\.\./x"),
        (lambda d: d.update(parent=3), "parent"),
        (lambda d: d.update(created=20261122), "created"),
    ],
)
def test_malformed_manifest_is_an_integrity_error(tmp_path, mutate, why):
    data = _manifest().to_dict()
    mutate(data)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match=why) as err:
        read_manifest(path)
    assert str(path) in str(err.value)


def test_unparsable_or_missing_manifest_names_the_file(tmp_path):
    path = tmp_path / "manifest.json"
    with pytest.raises(IntegrityError, match="missing"):
        read_manifest(path)
    path.write_text('{"format_version": 1, "version": NaN')
    with pytest.raises(IntegrityError, match=re.escape(str(path))):
        read_manifest(path)
    # Well-formed apart from a non-standard constant (Python's json writes NaN by default).
    for constant in ("NaN", "Infinity", "-Infinity"):
        path.write_text(json.dumps(_manifest().to_dict()).replace("1.5", constant))
        with pytest.raises(IntegrityError, match=constant):
            read_manifest(path)


@pytest.mark.parametrize(
    "name", ["", "/abs", "a/../b", "a//b", "./a", "a\\b", "manifest.json", "a\0b"]
)
def test_check_name_refuses_unsafe_names(name):
    with pytest.raises(ValueError):
        check_name(name)


def test_diff_manifests():
    old = _manifest()
    new = _manifest(
        files={"ranker.onnx": FileDigest(11, "c" * 64), "index.faiss": FileDigest(1, "d" * 64)},
        metrics={"test": {"ndcg@10": 0.33, "recall@10": 0.2}, "auc": 0.8},
    )
    d = diff_manifests(old, new)
    assert (d.added, d.removed, d.changed) == (("index.faiss",), ("ids.npy",), ("ranker.onnx",))
    assert d.metrics == {
        "auc": (None, 0.8),
        "latency_ms": (1.5, None),
        "test.ndcg@10": (0.31, 0.33),
    }
    assert not d.same_files
    assert diff_manifests(old, old).same_files
    assert flat_metrics({"a": {"b": 1, "c": "x", "d": True}}) == {"a.b": 1.0}
