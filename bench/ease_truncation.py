"""What cutting EASE to top-K tables costs, ranking every item by EASE alone on ml-100k validation.

EASE's weights ``B[h, c]`` (l2 = 250, the feature tables' setting) score a user's items as the
sum over the history. Compared: the dense ``B``; the history cut to its newest items (what a
request would read if it gathered the history items' lists); each history item's ``K`` largest
weights (rows); each candidate's ``K`` largest in-weights over the whole history (columns, what
:mod:`slimrank.ranking.neighbors` serves). NDCG@10 on the validation split, full ranking minus
the training items, seed 2020 as everywhere.

    .venv/bin/python bench/ease_truncation.py      # about a minute; fetches ml-100k if needed

Writes ``bench/results/ease_truncation.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimrank.evaluation.baselines import EaseConfig, ease_weights  # noqa: E402
from slimrank.evaluation.metrics import ranking_metrics  # noqa: E402
from slimrank.pipeline.config import DataConfig  # noqa: E402
from slimrank.pipeline.steps import data_step  # noqa: E402
from slimrank.ranking.histories import Histories  # noqa: E402

RESULTS = HERE / "results"


def keep_top(weights: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Return ``weights`` keeping the ``k`` largest magnitudes along ``axis`` (1: rows)."""
    w = weights if axis == 1 else weights.T
    idx = np.argpartition(-np.abs(w), k, axis=1)[:, :k]
    out = np.zeros_like(w)
    np.put_along_axis(out, idx, np.take_along_axis(w, idx, axis=1), axis=1)
    return out if axis == 1 else out.T


def main() -> int:
    data = data_step(DataConfig(source="movielens-100k"))
    train, truth = data.seen("valid"), data.truth("valid")
    history = Histories.from_matrix(train, data.seen_times("valid"))
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    seen = sp.csr_matrix(train)[users].toarray() > 0
    weights = ease_weights(train, EaseConfig(l2=250.0))  # (I, I) B[h, c]

    def ndcg(b: np.ndarray, cap: int = 0) -> float:
        x = history.recent(np.arange(history.n_rows), cap).matrix() if cap else train
        scores = np.asarray(sp.csr_matrix(x)[users] @ b)
        scores[seen] = -np.inf
        top = np.argsort(-scores, axis=1)[:, :10]
        return ranking_metrics(top, truth[users], (10,))["ndcg@10"]

    rows = [("dense EASE, whole history", ndcg(weights))]
    rows += [(f"dense EASE, {cap} newest history items", ndcg(weights, cap)) for cap in (100, 200)]
    for k in (100, 200, 400):
        rows.append((f"each history item's {k} largest weights", ndcg(keep_top(weights, k, 1))))
        rows.append(
            (f"each candidate's {k} largest in-weights (served)", ndcg(keep_top(weights, k, 0)))
        )
    lines = [
        "# EASE alone under truncation (ml-100k validation NDCG@10, full ranking)",
        "",
        "| weights read | NDCG@10 |",
        "|---|---:|",
        *(f"| {name} | {value:.4f} |" for name, value in rows),
        "",
        "Command: `.venv/bin/python bench/ease_truncation.py`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ease_truncation.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
