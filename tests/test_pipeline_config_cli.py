"""A bad pipeline config stops the CLI before any work, in one line; configs ship with slimrank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimrank.cli import main
from slimrank.pipeline.config import ConfigError, load_config, resolve_config, shipped_configs

TINY = shipped_configs()["tiny"]

BAD = {
    "wrong type": ('[student]\nseed = "x"\n', "student.seed: expected an integer, got a string"),
    "bool as int": ("[student]\nseed = true\n", "student.seed: expected an integer, got a boolean"),
    "nested wrong type": (
        "[two_tower.train]\nepochs = 2.5\n",
        "two_tower.train.epochs: expected an integer, got a number (2.5)",
    ),
    "unknown top key": ("seeed = 1\n", "seeed: unknown key"),
    "unknown nested key": (
        "[candidates.features]\ncooc_neighbours = 5\n",
        "candidates.features.cooc_neighbours: unknown key (did you mean cooc_neighbors?)",
    ),
    "syntax error": ("[student\nseed = 1\n", "TOML syntax error: "),
    "out of range": ("[prune]\nepochs = 0\n", "prune.epochs: 0: must be >= 1"),
    # Checked at load, not hours later when the teacher step builds its model.
    "teacher dropout": ("[teacher]\ndropout = 1.5\n", "teacher.dropout: 1.5: must lie in [0, 1)"),
    "teacher width": ("[teacher]\ndeep = [64, 0]\n", "teacher.deep: (64, 0): widths must be > 0"),
    "teacher id dropout": (
        "[teacher]\nid_dropout = -0.1\n",
        "teacher.id_dropout: -0.1: must lie in [0, 1)",
    ),
    "teacher cross layers": ("[teacher]\nn_cross = -1\n", "teacher.n_cross: -1: must be >= 0"),
    # Every user would hold every item: nothing left to recommend.
    "synthetic per user": (
        '[data]\nsource = "synthetic"\nsynthetic_items = 12\nsynthetic_per_user = 12\n',
        "data.synthetic_per_user: 12: must be below synthetic_items",
    ),
}


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", BAD.keys())
@pytest.mark.parametrize("command", ["pipeline", "compress"])
def test_bad_config_stops_with_one_line_naming_file_and_key(
    case: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = BAD[case]
    config = tmp_path / "bad.toml"
    config.write_text(text)
    outs = [tmp_path / "cache", tmp_path / "out", tmp_path / "bundles"]
    argv = [command, "--config", str(config), "--cache-dir", str(outs[0]), "--out", str(outs[1])]
    if command == "pipeline":
        argv += ["--bundles", str(outs[2])]
    code, err = _run_cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"slimrank: error: {config}: "), err
    assert expected in lines[0], err
    assert [p for p in outs if p.exists()] == []


def test_missing_config_file_stops_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.toml"
    outs = [tmp_path / "cache", tmp_path / "out", tmp_path / "bundles"]
    argv = ["pipeline", "--config", str(missing), "--cache-dir", str(outs[0])]
    code, err = _run_cli([*argv, "--out", str(outs[1]), "--bundles", str(outs[2])], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"slimrank: error: {missing}: no such config file, and not a shipped config "
        f"({', '.join(shipped_configs())})"
    ]
    assert [p for p in outs if p.exists()] == []


def test_min_ratio_zero_is_refused_not_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--min-ratio 0`` is checked like any other value, not taken for "not given"."""
    argv = ["pipeline", "--config", str(TINY), "--check-config", "--min-ratio", "0"]
    code, err = _run_cli([*argv, "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 2
    assert "--min-ratio 0.0: must be in (0, 1.5]" in err
    assert not (tmp_path / "cache").exists()


def test_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[student]\nseed = "x"\n')
    done = subprocess.run(
        [sys.executable, "-m", "slimrank.cli", "pipeline", "--config", "bad.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "slimrank: error: bad.toml: student.seed: expected an integer, got a string ('x')"
    ]
    assert sorted(os.listdir(tmp_path)) == ["bad.toml"]  # no runs/, no bundles/


def test_default_config_resolves_from_any_directory(tmp_path: Path) -> None:
    """The shipped configs are package data: the default works outside the repository."""
    done = subprocess.run(
        [sys.executable, "-m", "slimrank.cli", "pipeline", "--check-config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    shipped = shipped_configs()["pipeline"]
    assert done.stdout.split() == ["config", f"{shipped}:", "ok"]
    assert load_config("pipeline") == load_config(shipped)
    assert os.listdir(tmp_path) == []  # nothing run, nothing written


def test_config_names_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert set(shipped_configs()) >= {"pipeline", "tiny"}
    for name in ("tiny", "tiny.toml"):
        assert resolve_config(name) == TINY
    # An existing path wins over a shipped name.
    Path("tiny.toml").write_text("k = 5\n[candidates]\nn = 20\n")
    assert resolve_config("tiny.toml") == Path("tiny.toml")
    assert load_config("tiny.toml").k == 5
    assert load_config("tiny").k == 10
    # A path elsewhere is not a shipped name: a mistyped directory is an error, not tiny.
    with pytest.raises(ConfigError, match="no such config file"):
        resolve_config(tmp_path / "configs" / "tiny.toml")
