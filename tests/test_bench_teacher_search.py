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
        ("{lr: 1}", "--variant: '{lr: 1}': not JSON"),
        ("[1, 2]", "want a JSON object of overrides"),
        ('{"train.lrr": 0.001}', "--variant: the config has no train.lrr"),
        ('{"dropout": 1.5}', "dropout"),
    ],
)
def test_a_bad_variant_is_named_and_nothing_is_trained(
    tmp_path: Path, variant: str, message: str
) -> None:
    """A good variant first, then the bad one: the run stops before any training (no
    teacher step is even looked for) and writes no results file."""
    done = run(tmp_path, '{"train.lr": 0.001}', variant)
    assert done.returncode != 0
    assert message in done.stderr + done.stdout
    assert "no teacher step" not in done.stdout
    assert "cached teacher" not in done.stdout
    assert not (BENCH / "results" / "search-test.md").exists()


def test_without_a_cached_teacher_step_it_says_which_command_to_run(tmp_path: Path) -> None:
    done = run(tmp_path, '{"base_feature": "ease_score"}')
    assert done.returncode == 1, done.stderr
    assert "no teacher step; run slimrank pipeline --config pipeline" in done.stdout
    assert not (BENCH / "results" / "search-test.md").exists()


def test_drop_leaves_out_the_named_columns_and_keeps_the_rest_in_order() -> None:
    import numpy as np

    sys.path.insert(0, str(BENCH))
    from teacher_search import drop_columns

    from slimrank.ranking.features import CandidateFeatures

    names = ("retrieval_score", "user_vec_0", "user_vec_1", "ease_score", "item_vec_0")
    values = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    feats = CandidateFeatures(values, names, np.array([4, 7]), np.zeros((2, 3), dtype=np.int64))
    kept = drop_columns(feats, ["user_vec_", "item_vec_"])
    assert kept.names == ("retrieval_score", "ease_score")
    np.testing.assert_array_equal(kept.values, values[..., [0, 3]])
    np.testing.assert_array_equal(kept.user, feats.user)
    assert drop_columns(feats, ["nothing_"]).names == names
