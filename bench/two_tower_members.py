"""How much of the two-tower's quality is its seed, and what a sum of seeds gives (ml-100k).

Trains the shipped config's two-tower (``configs/pipeline.toml``) with seeds 0..4 at a few
member widths, then sums the first ``n`` of each width into one model with
:func:`slimrank.retrieval.ensemble.concat_two_towers` (what ``members = n`` under
``[two_tower.train]`` trains). Retrieval alone, exact search over every item: NDCG@10 on
validation (what a choice may read) and on test (reported, not used to choose), and each
row minus the shipped model (seed 0 at width 63) with a paired bootstrap interval over users.

    .venv/bin/python bench/two_tower_members.py    # about five minutes on 2 cores

Writes ``bench/results/two_tower_members.md``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimrank.evaluation.metrics import per_user_metrics  # noqa: E402
from slimrank.evaluation.paired import PerUser, paired_bootstrap  # noqa: E402
from slimrank.evaluation.protocol import evaluated_users, rank_users  # noqa: E402
from slimrank.pipeline.config import load_config  # noqa: E402
from slimrank.pipeline.steps import data_step, two_tower_model_config  # noqa: E402
from slimrank.retrieval.embeddings import export_embeddings, history_for  # noqa: E402
from slimrank.retrieval.ensemble import concat_two_towers  # noqa: E402
from slimrank.retrieval.train import train_two_tower  # noqa: E402

RESULTS = HERE / "results"
WIDTHS = (42, 53, 63)
SEEDS = (0, 1, 2, 3, 4)
VIEWS = ("valid", "test")


def per_user(model, split, view: str) -> PerUser:
    """Return ``model``'s per-user NDCG@10 on ``view``, ranking every unseen item."""
    truth = split.valid_matrix() if view == "valid" else split.test_matrix()
    seen = split.seen_for_valid() if view == "valid" else split.seen_for_test()
    users = evaluated_users(truth)
    history = history_for(split, view, model.config.max_history)
    user, item = export_embeddings(model, history, users=users)
    top = rank_users(lambda u: user[np.searchsorted(users, u)] @ item.T, users, seen, 10, 256)
    return PerUser(users, per_user_metrics(top, truth[users], 10)["ndcg"])


def main() -> int:
    config = load_config("pipeline")
    data = data_step(config.data)
    split = data.split
    shipped = config.two_tower
    models: dict[tuple[int, int], object] = {}
    for width in WIDTHS:
        step = dataclasses.replace(shipped, dim=width, id_dim=width)
        model_config = two_tower_model_config(step, data)
        for seed in SEEDS:
            train = dataclasses.replace(shipped.train, seed=seed, progress=False)
            models[width, seed] = train_two_tower(model_config, train, split).model
            print(f"trained width {width} seed {seed}", flush=True)
    base = {v: per_user(models[shipped.dim, 0], split, v) for v in VIEWS}
    lines = [
        "# Two-tower seeds and sums of seeds (ml-100k, retrieval alone, issue 15)",
        "",
        "The shipped two-tower config at each member width; a sum of n is the first n seeds "
        "concatenated into one model (`members = n`). Exact search over every item minus the "
        "user's seen items, NDCG@10 over the 943 users of each part. Intervals: the row minus "
        f"the shipped model (width {shipped.dim}, seed 0), paired bootstrap over users. Test "
        "is reported, not used to choose.",
        "",
        "| width | model | valid NDCG@10 | minus shipped [95% CI] | test NDCG@10 | "
        "minus shipped [95% CI] |",
        "|---:|---|---:|---|---:|---|",
    ]

    def row(width: int, name: str, model) -> None:
        cells = [str(width), name]
        for view in VIEWS:
            score = per_user(model, split, view)
            ci = paired_bootstrap(score, base[view])
            cells += [f"{score.mean:.4f}", f"{ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]"]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)

    for width in WIDTHS:
        for seed in SEEDS:
            row(width, f"seed {seed}", models[width, seed])
        for n in range(2, len(SEEDS) + 1):
            summed = concat_two_towers([models[width, s] for s in SEEDS[:n]])
            row(width, f"sum of seeds 0-{n - 1}", summed)
    lines += ["", "Command: `.venv/bin/python bench/two_tower_members.py`"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "two_tower_members.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
