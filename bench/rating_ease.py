"""What reading the rating values would give EASE: ml-100k validation NDCG@10, paired.

No system under the project's protocol reads rating values (every rating is a binary
interaction; README, Evaluation protocol). This measures what that leaves on the table for
the strongest peer: EASE fitted and scored on rows whose entries are ``rating ** power``
(scaled to mean 1, so that l2 keeps its scale), over a grid of powers and l2, against binary
EASE at the l2 validation chose for the peer (500). Fitted on train, scored on validation;
nothing reads test.

    .venv/bin/python bench/rating_ease.py      # about two minutes; fetches ml-100k if needed

Writes ``bench/results/rating_ease.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimrank.evaluation.baselines import EaseConfig, ease_weights  # noqa: E402
from slimrank.evaluation.metrics import per_user_metrics  # noqa: E402
from slimrank.evaluation.paired import PerUser, paired_bootstrap  # noqa: E402
from slimrank.evaluation.protocol import evaluated_users, rank_users  # noqa: E402
from slimrank.pipeline.config import DataConfig  # noqa: E402
from slimrank.pipeline.steps import data_step  # noqa: E402

RESULTS = HERE / "results"
POWERS = (0.5, 1.0, 2.0)
L2S = (300.0, 500.0, 800.0, 1200.0)
PEER_L2 = 500.0


def weighted_rows(split, power: float) -> sp.csr_matrix:
    """Return the ``(U, I)`` training matrix with each entry ``rating ** power``, mean 1."""
    train = split.train
    w = train.rating.astype(np.float64) ** power
    m = sp.coo_matrix(
        (w / w.mean(), (train.user, train.item)), shape=(split.n_users, split.n_items)
    )
    return sp.csr_matrix(m)


def per_user(rows: sp.csr_matrix, l2: float, seen, truth, users) -> PerUser:
    """Return EASE's per-user validation NDCG@10, fitted and scored on ``rows``."""
    weights = ease_weights(rows, EaseConfig(l2=l2))
    top = rank_users(lambda u: np.asarray(rows[u] @ weights), users, seen, 10, 256)
    return PerUser(users, per_user_metrics(top, truth[users], 10)["ndcg"])


def main() -> int:
    split = data_step(DataConfig(source="movielens-100k")).split
    seen, truth = split.train_matrix(), split.valid_matrix()
    users = evaluated_users(truth)
    binary = seen.astype(np.float64)
    base = per_user(binary, PEER_L2, seen, truth, users)
    lines = [
        "# EASE reading rating values (ml-100k validation, issue 15)",
        "",
        "Rows are `rating ** power` scaled to mean 1; fitted on train, ranked over every item "
        "minus the training items, NDCG@10 over the 943 validation users. The interval is the "
        f"row minus binary EASE at l2 = {PEER_L2:g} (the peer), paired over users.",
        "",
        "| input | l2 | valid NDCG@10 | minus binary EASE [95% CI] |",
        "|---|---:|---:|---|",
        f"| binary (the peer) | {PEER_L2:g} | {base.mean:.4f} | - |",
    ]
    for power in POWERS:
        rows = weighted_rows(split, power)
        for l2 in L2S:
            row = per_user(rows, l2, seen, truth, users)
            ci = paired_bootstrap(row, base)
            lines.append(
                f"| rating ** {power:g} | {l2:g} | {row.mean:.4f} | "
                f"{ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] |"
            )
            print(lines[-1], flush=True)
    lines += ["", "Command: `.venv/bin/python bench/rating_ease.py`"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rating_ease.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
