"""The losses ``bench/teacher_losses.py`` tries, against hand-computed references."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from teacher_losses import (  # noqa: E402
    SOFTMAX,
    _ideal_dcg,
    approx_ndcg,
    lambda_loss,
    smoothed_softmax,
)


def lists() -> tuple:
    scores = torch.tensor([[3.0, 1.0, 0.5, -9.0], [0.2, 2.0, 1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    return scores, labels, mask


def test_ideal_dcg_is_the_sum_of_the_first_discounts() -> None:
    got = _ideal_dcg(torch.tensor([1, 2, 12]), 20, k=10)
    want = [1.0, 1.0 + 1 / math.log2(3), sum(1 / math.log2(r + 2) for r in range(10))]
    assert torch.allclose(got, torch.tensor(want))


def test_smoothing_zero_is_the_pipelines_softmax() -> None:
    scores, labels, mask = lists()
    assert torch.allclose(smoothed_softmax(scores, labels, mask, eps=0.0), SOFTMAX(*lists()))
    assert not torch.allclose(smoothed_softmax(scores, labels, mask), SOFTMAX(*lists()))


def test_lambda_adds_the_delta_ndcg_weighted_pair_losses_by_hand() -> None:
    scores, labels, mask = lists()
    d = [1 / math.log2(r + 2) for r in range(4)]
    # list 0: ranks 3.0 -> 0, 1.0 -> 1, 0.5 -> 2 (the pad is masked); positives 0 and 2
    idcg0 = d[0] + d[1]
    pair0 = abs(d[2] - d[1]) / idcg0 * math.log1p(math.exp(-(0.5 - 1.0)))
    pair0 += abs(d[0] - d[1]) / idcg0 * math.log1p(math.exp(-(3.0 - 1.0)))
    # list 1: ranks 2.0 -> 0, 1.0 -> 1, 0.2 -> 2, 0.0 -> 3; positive is 1.0 at rank 1
    idcg1 = d[0]
    pair1 = sum(
        abs(d[1] - d[r]) / idcg1 * math.log1p(math.exp(-(1.0 - s)))
        for r, s in ((0, 2.0), (2, 0.2), (3, 0.0))
    )
    want = SOFTMAX(scores, labels, mask) + (pair0 / 2 + pair1 / 1) / 2
    assert torch.allclose(lambda_loss(scores, labels, mask), want, atol=1e-6)


def test_approx_ndcg_reaches_the_true_ndcg_when_scores_are_far_apart() -> None:
    scores, labels, mask = lists()
    wide = scores * 100  # sigmoid ranks become the exact ranks
    d = [1 / math.log2(r + 2) for r in range(4)]
    ndcg = ((d[0] + d[2]) / (d[0] + d[1]) + d[1] / d[0]) / 2
    want = -ndcg + 0.5 * SOFTMAX(wide, labels, mask)
    assert torch.allclose(approx_ndcg(wide, labels, mask), want, atol=1e-4)


def test_lists_without_a_positive_are_left_out() -> None:
    scores, labels, mask = lists()
    empty = torch.zeros_like(labels[:1])
    both = (
        torch.cat([scores, scores[:1]]),
        torch.cat([labels, empty]),
        torch.cat([mask, mask[:1]]),
    )
    for loss in (lambda_loss, smoothed_softmax, approx_ndcg):
        assert torch.allclose(loss(*both), loss(scores, labels, mask), atol=1e-6), loss.__name__


def test_without_a_cached_teacher_step_it_says_which_command_to_run(tmp_path: Path) -> None:
    """Run where no `make demo` cache is: a message naming the missing step and the command
    that makes it, exit 1, and no results file written."""
    import subprocess

    bench = Path(__file__).resolve().parent.parent / "bench"
    done = subprocess.run(
        [sys.executable, str(bench / "teacher_losses.py"), "--losses", "softmax", "--out", "x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "no teacher step; run slimrank pipeline --config pipeline" in done.stdout
    assert not (bench / "results" / "x.md").exists()
