"""``bench/teacher_search.py`` checks every variant before it reads the cache or trains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(tmp_path: Path, *variants: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(BENCH / "teacher_search.py"), "--out", "search-test"]
    for v in variants:
        argv += ["--variant", v]
    return subprocess.run(
        argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("{lr: 1}", "argument --variant: '{lr: 1}': not JSON"),
        ("[1, 2]", "argument --variant: '[1, 2]': want a JSON object of overrides"),
        (
            '{"train.lrr": 0.001}',
            '--variant: the config has no train.lrr (in {"train.lrr": 0.001})',
        ),
        (
            '{"dropout": 1.5}',
            '--variant {"dropout": 1.5}: teacher.dropout: 1.5: must lie in [0, 1)',
        ),
        (
            '{"deep": [64, 0]}',
            '--variant {"deep": [64, 0]}: teacher.deep: (64, 0): widths must be > 0',
        ),
    ],
)
def test_a_bad_variant_is_named_and_nothing_is_trained(
    tmp_path: Path, variant: str, message: str
) -> None:
    """A good variant first, then the bad one: exit 2 with the usage line and the bad
    variant named, before the cache is even looked for; no results file."""
    done = run(tmp_path, '{"train.lr": 0.001}', variant)
    assert done.returncode == 2, done.stderr
    assert "usage: teacher_search.py" in done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert "no teacher step" not in done.stdout
    assert not (BENCH / "results" / "search-test.md").exists()


def test_an_unknown_config_is_named(tmp_path: Path) -> None:
    argv = [sys.executable, str(BENCH / "teacher_search.py"), "--config", "nosuch"]
    done = subprocess.run(
        [*argv, "--variant", "{}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--config nosuch: " in done.stderr and "Traceback" not in done.stderr


def test_without_a_cached_teacher_step_it_says_which_command_to_run(tmp_path: Path) -> None:
    done = run(tmp_path, '{"base_feature": "ease_score"}')
    assert done.returncode == 1, done.stderr
    assert "no teacher step; run slimrank pipeline --config pipeline" in done.stdout
    assert not (BENCH / "results" / "search-test.md").exists()


def test_drop_leaves_out_the_named_columns_and_keeps_the_rest_in_order() -> None:
    import numpy as np

    sys.path.insert(0, str(BENCH))
    from cached_teacher import drop_columns

    from slimrank.ranking.features import CandidateFeatures

    names = ("retrieval_score", "user_vec_0", "user_vec_1", "ease_score", "item_vec_0")
    values = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    feats = CandidateFeatures(values, names, np.array([4, 7]), np.zeros((2, 3), dtype=np.int64))
    kept = drop_columns(feats, ["user_vec_", "item_vec_"])
    assert kept.names == ("retrieval_score", "ease_score")
    np.testing.assert_array_equal(kept.values, values[..., [0, 3]])
    np.testing.assert_array_equal(kept.user, feats.user)
    assert drop_columns(feats, ["nothing_"]).names == names


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.toml pointed at the cache of a real tiny pipeline run (its teacher step done)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_pipeline import TINY, tiny_pipeline

    run = tiny_pipeline(tmp_path_factory)
    text = TINY.read_text().replace(
        'cache_dir = "runs/cache-tiny"', f'cache_dir = "{run.config.cache_dir}"'
    )
    assert run.config.cache_dir in text
    config = tmp_path_factory.mktemp("search") / "tiny-cached.toml"
    config.write_text(text)
    return config


def test_on_a_cached_run_bad_columns_are_refused_and_a_variant_trains(
    tiny_config: Path, tmp_path: Path
) -> None:
    """With a cache: a base_feature the columns lack, or a --drop prefix that matches
    nothing, stops before training (exit 2, named); with no overrides the search trains the
    cached teacher again to the digit (the control), and with --drop its row is written."""
    argv = [sys.executable, str(BENCH / "teacher_search.py"), "--config", str(tiny_config)]

    def search(*more: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*argv, *more], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
        )

    bad = search("--variant", '{"base_feature": "nosuch"}', "--out", "search-test")
    assert bad.returncode == 2, bad.stderr
    assert '--variant {"base_feature": "nosuch"}: teacher.base_feature' in bad.stderr
    assert "cached teacher" not in bad.stdout
    bad = search("--variant", "{}", "--drop", "user_vec_", "nosuch_", "--out", "search-test")
    assert bad.returncode == 2, bad.stderr
    assert "--drop: no column starts with nosuch_" in bad.stderr
    assert not (BENCH / "results" / "search-test.md").exists()

    out = f"search-test-{tmp_path.name}"
    try:
        control = search("--variant", "{}", "--out", out)
        assert control.returncode == 0, control.stderr
        control_text = (BENCH / "results" / f"{out}.md").read_text()
        done = search("--variant", "{}", "--drop", "user_vec_", "--out", out)
        assert done.returncode == 0, done.stderr
        text = (BENCH / "results" / f"{out}.md").read_text()
    finally:
        (BENCH / "results" / f"{out}.md").unlink(missing_ok=True)

    def row(table: str) -> list[str]:
        rows = [line for line in table.splitlines() if line.startswith("| `{}`")]
        assert len(rows) == 1, table
        return [c.strip() for c in rows[0].strip("|").split("|")]

    # No overrides and no columns left out: the cached teacher again, to the digit.
    cached = [line for line in control_text.splitlines() if line.startswith("| none")]
    assert row(control_text)[2] == cached[0].split("|")[3].strip()
    assert row(control_text)[3] == "+0.0000 [+0.0000, +0.0000]"
    assert "--variant '{}' --drop user_vec_" in text
    assert "left out" in text and " columns" in text
    assert 0.0 <= float(row(text)[2]) <= 1.0
