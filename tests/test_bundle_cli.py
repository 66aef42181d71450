"""``slimrank bundle ...`` run in-process through the real top-level CLI."""

from __future__ import annotations

import json
import os

import pytest

from slimrank.bundle.store import current_version, publish
from slimrank.cli import main


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "bundles"
    publish(r, {"ranker.onnx": b"one"}, metrics={"test": {"ndcg@10": 0.301}}, parent="t-1")
    publish(
        r, {"ranker.onnx": b"two"}, metrics={"test": {"ndcg@10": 0.312}}, gate={"accepted": True}
    )
    return r


def run(capsys, *argv):
    code = main(["bundle", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_marks_current_and_shows_metrics(root, capsys):
    v1, v2 = sorted(p.name for p in root.iterdir() if p.name.startswith("v"))
    code, out, _ = run(capsys, "list", "--root", str(root))
    assert code == 0
    rows = {line.split("│")[2].strip(): line for line in out.splitlines() if "│ v0000" in line}
    assert set(rows) == {v1, v2}
    assert "*" in rows[v2].split("│")[1] and "*" not in rows[v1].split("│")[1]
    assert "test.ndcg@10=0.312" in rows[v2] and "pass" in rows[v2]
    assert "t-1" in rows[v1] and "pass" not in rows[v1]  # published without a gate


def test_list_shows_the_gates_verdict_and_mode(tmp_path, capsys):
    r = tmp_path / "bundles"
    publish(r, {"a": b"1"}, gate={"accepted": True, "mode": "dynamic"})
    publish(r, {"a": b"2"}, gate={"accepted": False, "mode": None})
    publish(r, {"a": b"3"}, gate={"passed": True})  # not the gate's key: shown as no gate
    code, out, _ = run(capsys, "list", "--root", str(r))
    cells = [line.split("│") for line in out.splitlines() if "│ v0000" in line]
    header = next(line.split("┃") for line in out.splitlines() if "┃ version" in line)
    column = [c.strip() for c in header].index("gate")
    assert code == 0
    assert [c[column].strip() for c in cells] == ["", "FAIL", "pass (dynamic)"]  # newest first


def test_bundles_flag_names_the_same_root_as_root(root, tmp_path, capsys, monkeypatch):
    """``--bundles``, as ``serve``, ``pipeline`` and ``retrain`` spell it, is ``--root`` here."""
    monkeypatch.setenv("SLIMRANK_BUNDLES", str(tmp_path / "elsewhere"))
    assert run(capsys, "list", "--root", str(root)) == run(capsys, "list", "--bundles", str(root))
    code, out, _ = run(capsys, "verify", "--bundles", str(root))
    assert code == 0 and current_version(root) in out


def test_root_from_environment_and_empty_root(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLIMRANK_BUNDLES", str(tmp_path / "none"))
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert "no bundles in" in out and "none" in out


def test_an_empty_slimrank_bundles_means_the_default_root(root, tmp_path, capsys, monkeypatch):
    """``SLIMRANK_BUNDLES=`` (set but empty, as an env file may leave it) is ``./bundles``,
    not the current directory."""
    monkeypatch.setenv("SLIMRANK_BUNDLES", "")
    monkeypatch.chdir(tmp_path)  # root is tmp_path / "bundles"
    code, out, _ = run(capsys, "list")
    assert code == 0 and "no bundles in" not in out
    assert current_version(root) in out


def test_show_and_verify(root, capsys):
    code, out, _ = run(capsys, "show", "1", "--root", str(root))
    assert code == 0
    assert json.loads(out)["parent"] == "t-1"
    code, out, _ = run(capsys, "verify", "--root", str(root))
    assert code == 0
    assert out.startswith(current_version(root)) and "OK (1 files, 3 bytes" in out


def test_verify_and_promote_of_corrupt_bundle_exit_2_naming_the_file(root, capsys):
    current = current_version(root)
    old = next(p for p in sorted(root.iterdir()) if p.name.startswith("v"))
    target = old / "ranker.onnx"
    os.chmod(target, 0o644)
    target.write_bytes(b"ONE")
    code, _, err = run(capsys, "verify", "1", "--root", str(root))
    assert code == 2
    assert f"altered: {target}" in err
    code, _, err = run(capsys, "promote", "1", "--root", str(root))
    assert code == 2 and str(target) in err
    assert current_version(root) == current
    code, _, err = run(capsys, "rollback", "--root", str(root))
    assert code == 2 and "no earlier served version" in err
    assert current_version(root) == current


def test_rollback_then_promote(root, capsys):
    v1, v2 = sorted(p.name for p in root.iterdir() if p.name.startswith("v"))
    code, out, _ = run(capsys, "rollback", "--root", str(root))
    assert code == 0
    assert f"rolled back CURRENT: {v2} -> {v1}" in out
    assert current_version(root) == v1
    code, out, _ = run(capsys, "promote", v2, "--root", str(root))
    assert (code, out.strip()) == (0, f"CURRENT: {v1} -> {v2}")
    code, out, _ = run(capsys, "history", "--root", str(root))
    rows = [
        [c.strip() for c in line.split("│")[2:5]] for line in out.splitlines() if "│ 20" in line
    ]
    assert rows == [
        ["publish", "-", v1],
        ["publish", v1, v2],
        ["rollback", v2, v1],
        ["promote", v1, v2],
    ]


def test_unknown_version_and_diff(root, capsys):
    code, _, err = run(capsys, "show", "7", "--root", str(root))
    assert code == 2 and "no published version '7'" in err
    code, out, _ = run(capsys, "diff", "1", "--root", str(root))
    assert code == 0
    d = json.loads(out)
    assert d["changed"] == ["ranker.onnx"]
    assert d["metrics"] == {"test.ndcg@10": [0.301, 0.312]}


@pytest.mark.parametrize("argv", [["promote", "1"], ["rollback"], ["verify"], ["show"]])
def test_missing_root_is_a_clean_error(tmp_path, capsys, argv):
    code, _, err = run(capsys, *argv, "--root", str(tmp_path / "nope"))
    assert code == 2
    assert err.startswith("slimrank: error: ") and "nope" in err
