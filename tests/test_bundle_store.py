"""The bundle store on real directories: publish, verify, promote, rollback, prune, crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from slimrank.bundle import store
from slimrank.bundle.formats import read_npy, write_npy
from slimrank.bundle.manifest import MANIFEST, read_manifest
from slimrank.bundle.store import (
    BundleError,
    StoreConfig,
    current_version,
    list_versions,
    open_bundle,
    promote,
    publish,
    rollback,
)
from slimrank.errors import IntegrityError

REPO = Path(__file__).resolve().parents[1]


def _files(i: int) -> dict[str, bytes]:
    return {
        "ranker.onnx": f"ranker {i}".encode() * 10,
        "index.faiss": bytes([i % 256]) * 100,
        "tables/items.parquet": f"items {i}".encode(),
    }


def _corrupt(path: Path, data: bytes | None = None, truncate: int | None = None) -> None:
    os.chmod(path, 0o644)  # published files are read-only
    if truncate is not None:
        os.truncate(path, truncate)
    elif data is not None:
        path.write_bytes(data)


def test_publish_then_open_verifies_and_reads(tmp_path):
    root = tmp_path / "bundles"
    src = tmp_path / "emb.npy"
    write_npy(src, np.eye(3, dtype=np.float32))
    v = publish(
        root,
        {"user_emb.npy": src, "ranker.onnx": b"onnx"},
        config={"keep": 1},
        metrics={"test": {"ndcg@10": 0.3}},
        gate={"passed": True},
        parent="teacher-7",
    )
    assert list_versions(root) == [v]
    assert current_version(root) == v
    b = open_bundle(root)
    assert b.version == v
    assert sorted(b.files) == ["ranker.onnx", "user_emb.npy"]
    np.testing.assert_array_equal(read_npy(b.file("user_emb.npy")), np.eye(3))
    m = b.manifest
    assert (m.parent, dict(m.gate), m.metrics["test"]["ndcg@10"]) == (
        "teacher-7",
        {"passed": True},
        0.3,
    )
    assert m.created.endswith("Z")
    with pytest.raises(KeyError):
        b.file("nope")


def test_publish_with_a_staging_function(tmp_path):
    def stage(d: Path) -> None:
        write_npy(d / "ids.npy", np.arange(4))
        (d / "sub").mkdir()
        (d / "sub" / "x.json").write_text("{}")

    v = publish(tmp_path, stage)
    assert sorted(open_bundle(tmp_path, v).files) == ["ids.npy", "sub/x.json"]


def test_versions_increase_and_resolve_by_sequence(tmp_path):
    vs = [publish(tmp_path, _files(i)) for i in range(3)]
    assert vs == sorted(vs) == list_versions(tmp_path)
    assert [int(v[1:7]) for v in vs] == [1, 2, 3]
    assert store.resolve_version(tmp_path, "2") == vs[1]
    with pytest.raises(BundleError, match="'9'"):
        store.resolve_version(tmp_path, "9")
    for bad in ("../etc", "latest"):
        with pytest.raises(BundleError):
            store.resolve_version(tmp_path, bad)
        with pytest.raises(BundleError):
            store.verify_version(tmp_path, bad)


@pytest.mark.parametrize(
    ("damage", "kind"),
    [
        (lambda p: _corrupt(p, data=b"X" * p.stat().st_size), "altered"),
        (lambda p: _corrupt(p, truncate=3), "truncated"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_damaged_file_fails_open_and_promote_names_it(tmp_path, damage, kind):
    good = publish(tmp_path, _files(1))
    bad = publish(tmp_path, _files(2), make_current=False)
    target = tmp_path / bad / "index.faiss"
    damage(target)
    with pytest.raises(IntegrityError) as err:
        open_bundle(tmp_path, bad)
    assert f"{kind}: {target}" in str(err.value)
    with pytest.raises(IntegrityError, match=r"index\.faiss"):
        promote(tmp_path, bad)
    assert current_version(tmp_path) == good
    open_bundle(tmp_path)  # the served version is untouched


def test_every_bad_file_is_named_at_once(tmp_path):
    v = publish(tmp_path, _files(1))
    _corrupt(tmp_path / v / "ranker.onnx", truncate=1)
    (tmp_path / v / "tables" / "items.parquet").unlink()
    (tmp_path / v / "stray.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(IntegrityError) as err:
        open_bundle(tmp_path)
    msg = str(err.value)
    for line in ("truncated: ", "missing: ", "unexpected: "):
        assert line in msg
    for name in ("ranker.onnx", "tables/items.parquet", "stray.pkl"):
        assert str(tmp_path / v / name) in msg


def test_copied_version_directory_is_refused(tmp_path):
    v = publish(tmp_path, _files(1))
    fake = "v000009-20261122T000000Z"
    os.rename(tmp_path / v, tmp_path / fake)
    with pytest.raises(IntegrityError, match=f"not {fake}"):
        open_bundle(tmp_path, fake)


def test_rollback_restores_previous_and_skips_corrupt(tmp_path):
    v1, v2, v3 = (publish(tmp_path, _files(i)) for i in range(3))
    _corrupt(tmp_path / v2 / "ranker.onnx", truncate=0)
    old, new, skipped = rollback(tmp_path)
    assert (old, new, skipped) == (v3, v1, [f"{v2}: failed verification"])
    assert current_version(tmp_path) == v1
    with pytest.raises(BundleError, match="no earlier served version"):
        rollback(tmp_path)
    assert current_version(tmp_path) == v1
    assert promote(tmp_path, v3) == (v1, v3)
    assert rollback(tmp_path)[1] == v1


def test_rollback_follows_what_was_served_not_sequence_order(tmp_path):
    v1 = publish(tmp_path, _files(1))
    failed_gate = publish(tmp_path, _files(2), gate={"passed": False}, make_current=False)
    v3 = publish(tmp_path, _files(3))
    assert rollback(tmp_path) == (v3, v1, [])  # never onto the unserved, gate-failed bundle
    v4 = publish(tmp_path, _files(4))
    assert rollback(tmp_path) == (v4, v1, [])  # not back onto v3, which was rolled away from
    assert failed_gate in list_versions(tmp_path)
    # A lost history (say, a crash mid-append) degrades to "nothing to undo" ...
    (tmp_path / "HISTORY").write_text('{"version": "v0000')
    with pytest.raises(BundleError, match="promote VERSION"):
        rollback(tmp_path)
    assert store.served_stack(tmp_path) == [v1]
    # ... and the next move of CURRENT is recorded on a line of its own, with where it came from.
    promote(tmp_path, v4)
    assert store.served_stack(tmp_path) == [v1, v4]
    assert rollback(tmp_path) == (v4, v1, [])


def test_rollback_without_current(tmp_path):
    with pytest.raises(BundleError, match="no CURRENT"):
        rollback(tmp_path)


def test_prune_keeps_last_k_current_and_its_predecessor(tmp_path):
    cfg = StoreConfig(keep=2)
    vs = [publish(tmp_path, _files(i), store=cfg) for i in range(5)]
    assert list_versions(tmp_path) == vs[-2:]
    # CURRENT stays on an old version while newer ones arrive unpromoted.
    older = [publish(tmp_path, _files(i)) for i in (10, 11)]
    assert current_version(tmp_path) == older[1]
    newer = [publish(tmp_path, _files(i), make_current=False, store=cfg) for i in range(20, 24)]
    assert list_versions(tmp_path) == [*older, *newer[-2:]]
    assert rollback(tmp_path)[1] == older[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(ValueError, match="keep=0"):
        StoreConfig(keep=0)


def test_prune_protects_the_rollback_target_that_is_still_there(tmp_path):
    v1, v2, v3 = (publish(tmp_path, _files(i)) for i in range(3))
    # The most recently served earlier version is gone (deleted by hand): the rollback target
    # is now v1, and pruning to one version must keep it.
    os.rename(tmp_path / v2, tmp_path / ".tmp-gone")
    assert store.prune(tmp_path, StoreConfig(keep=1)) == []
    assert list_versions(tmp_path) == [v1, v3]
    assert rollback(tmp_path) == (v3, v1, [f"{v2}: no longer present"])


def test_rollback_candidates_name_each_version_once(tmp_path):
    v1, v2 = (publish(tmp_path, _files(i)) for i in range(2))
    promote(tmp_path, v1)
    v3 = publish(tmp_path, _files(3))
    assert store.served_stack(tmp_path) == [v1, v2, v1, v3]
    assert store.rollback_candidates(tmp_path) == [v1, v2]


def test_versions_list_by_sequence_past_six_digits_and_only_real_directories(tmp_path):
    for name in ("v1000000-20260101T000000Z", "v999999-20260101T000000Z"):
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST).write_text("{}")
    assert list_versions(tmp_path) == ["v999999-20260101T000000Z", "v1000000-20260101T000000Z"]
    # A symlink named like a version, to a real version, is not a version.
    (tmp_path / "v000005-20260101T000000Z").symlink_to(tmp_path / "v999999-20260101T000000Z")
    assert "v000005-20260101T000000Z" not in list_versions(tmp_path)
    (tmp_path / "CURRENT").write_text("v000005-20260101T000000Z\n")
    with pytest.raises(IntegrityError, match="CURRENT"):
        current_version(tmp_path)


def test_published_files_are_read_only_and_stray_tmp_files_are_left_alone(tmp_path):
    (tmp_path / ".tmp-notes").write_text("not a staging directory")
    v = publish(tmp_path, _files(1))
    for path in open_bundle(tmp_path, v).files.values():
        assert path.stat().st_mode & 0o222 == 0
    assert (tmp_path / ".tmp-notes").is_file()
    # Sequence numbers are ASCII digits only: another script's "1" is not version 1.
    assert store.resolve_version(tmp_path, "1") == v
    with pytest.raises(BundleError):
        store.resolve_version(tmp_path, "\u0661")


def test_stale_and_manifestless_directories_are_invisible(tmp_path):
    v = publish(tmp_path, _files(1))
    # A staging dir that already got its manifest, and a version-named dir without one.
    stale = tmp_path / ".tmp-deadbeef"
    stale.mkdir()
    (stale / MANIFEST).write_bytes((tmp_path / v / MANIFEST).read_bytes())
    (tmp_path / "v000050-20261122T000000Z").mkdir()
    assert list_versions(tmp_path) == [v]
    v2 = publish(tmp_path, _files(2))
    assert int(v2[1:7]) == 2  # the manifest-less directory does not count either
    assert not stale.exists()


def test_failed_staging_leaves_nothing(tmp_path):
    v = publish(tmp_path, _files(1))

    def stage(d: Path) -> None:
        (d / "half").write_bytes(b"x")
        raise RuntimeError("trainer crashed")

    with pytest.raises(RuntimeError):
        publish(tmp_path, stage)
    with pytest.raises(ValueError, match="bad bundle file name"):
        publish(tmp_path, {"../escape": b"x"})
    with pytest.raises(ValueError, match=r"manifest\.json"):
        publish(tmp_path, lambda d: (d / MANIFEST).write_text("{}"))
    with pytest.raises(ValueError):
        publish(tmp_path, {"a": b"x"}, metrics={"ndcg": float("nan")})
    assert list_versions(tmp_path) == [v]
    assert current_version(tmp_path) == v
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "CURRENT", "HISTORY", v]


def test_corrupt_current_pointer_is_an_integrity_error(tmp_path):
    publish(tmp_path, _files(1))
    (tmp_path / "CURRENT").write_text("v000007-20261122T000000Z\n")
    with pytest.raises(IntegrityError, match="CURRENT"):
        open_bundle(tmp_path)


_KILLED_PUBLISH = textwrap.dedent(
    """
    import os, sys, time
    from slimrank.bundle.store import publish

    def pause():
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
        time.sleep(60)

    def stage(d):
        (d / "ranker.onnx").write_bytes(b"new ranker" * 1000)
        if sys.argv[2] == "staging":
            pause()

    if sys.argv[2] == "rename":
        real = os.rename
        def rename(src, dst):
            if "v0000" in str(dst):  # the manifest is written; the version not yet visible
                pause()
            real(src, dst)
        os.rename = rename

    publish(sys.argv[1], stage)
    """
)


@pytest.mark.parametrize("point", ["staging", "rename"])
def test_publish_killed_midway_leaves_no_visible_version(tmp_path, point):
    v = publish(tmp_path, _files(1))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PUBLISH, str(tmp_path), point],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert proc.stdout.readline() == b"ready\n"
        stale = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
        assert len(stale) == 1
        assert (stale[0] / MANIFEST).exists() == (point == "rename")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert list_versions(tmp_path) == [v]
    assert current_version(tmp_path) == v
    open_bundle(tmp_path)
    # The killed process's lock died with it; the next publish cleans up and succeeds.
    v2 = publish(tmp_path, _files(2))
    assert list_versions(tmp_path) == [v, v2]
    assert not stale[0].exists()


def test_concurrent_reader_sees_only_complete_versions(tmp_path):
    first = publish(tmp_path, _files(0))
    stop = threading.Event()
    seen: set[str] = set()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                v = current_version(tmp_path)
                m = read_manifest(tmp_path / v / MANIFEST)
            except Exception as err:  # recorded: an exception would only end the thread
                errors.append(repr(err))
                continue
            if m.version != v or len(m.files) != 3:
                errors.append(v)
            seen.add(v)

    t = threading.Thread(target=reader)
    t.start()
    try:
        published = [publish(tmp_path, _files(i), store=StoreConfig(keep=25)) for i in range(20)]
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert seen <= {first, *published}
    assert len(seen) >= 3  # the reader really ran while CURRENT moved
    assert current_version(tmp_path) == published[-1]


def test_concurrent_publishers_get_distinct_consecutive_versions(tmp_path):
    results: list[str] = []

    def worker(k: int) -> None:
        results.extend(
            publish(tmp_path, _files(k * 10 + i), store=StoreConfig(keep=20)) for i in range(3)
        )

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list_versions(tmp_path)
    assert [int(v[1:7]) for v in list_versions(tmp_path)] == list(range(1, 13))
    assert current_version(tmp_path) in results


@pytest.mark.parametrize(
    "name",
    [
        "v000001-20260101T000000Z\n",  # $ would match before a final newline
        "v\u0660\u0660\u0660\u0660\u0660\u0661-20260101T000000Z",  # Arabic-Indic digits
        "v000001-2026\uff10101T000000Z",  # a fullwidth digit
        " v000001-20260101T000000Z",
    ],
)
def test_version_names_are_strict_ascii(name: str) -> None:
    from slimrank.bundle.versions import parse_version

    assert parse_version("v000001-20260101T000000Z") == 1
    assert parse_version(name) is None
