"""Would a stronger teacher help? LightGBM lambdarank against the MLP teacher, on validation.

Issue 15, idea (a): the student is distilled from the teacher's scores, so a teacher that ranks
the validation lists better is worth trying. This trains a gradient-boosted ranker
(LightGBM's lambdarank; Burges 2010) on the pipeline's training lists (same candidates and
features as the MLP teacher), chooses its number of trees on validation NDCG@10 as the MLP's
epochs are, and compares it, and a per-user z-score blend of the two, with the cached MLP
teacher on the validation view: pipeline NDCG@10 and a paired bootstrap interval over users.
Nothing here reads the test view.

Reads the candidates and teacher steps of ``slimrank pipeline --config CONFIG`` from the
step cache::

    .venv/bin/python bench/teacher_variants.py [--config pipeline] [--seeds 0 1 2]

Writes ``bench/results/teacher_variants.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # cached_teacher.py

from cached_teacher import (  # noqa: E402
    CachedTeacher,
    drop_columns,
    load_cached_teacher,
    train_against_cached,
)

from slimrank.evaluation.paired import paired_bootstrap  # noqa: E402
from slimrank.ranking.features import CandidateFeatures  # noqa: E402
from slimrank.ranking.pipeline_eval import pipeline_per_user  # noqa: E402

RESULTS = HERE / "results"


def flat(feats: CandidateFeatures, labels: np.ndarray | None = None) -> tuple:
    """Return the real candidates' rows, their labels and each list's size (positive lists)."""
    mask = feats.mask
    if labels is not None:  # lambdarank learns nothing from a list without a positive
        keep = ((labels > 0) & mask).any(axis=1)
        feats = feats.take(keep)
        labels = labels[keep]
        mask = feats.mask
    x = feats.values[mask]
    y = None if labels is None else (labels[mask] > 0).astype(np.int32)
    return x, y, mask.sum(axis=1)


def scatter(feats: CandidateFeatures, flat_scores: np.ndarray) -> np.ndarray:
    """Return ``(U, N)`` scores from the real candidates' flat scores; ``-inf`` at pads."""
    out = np.full(feats.items.shape, -np.inf, dtype=np.float64)
    out[feats.mask] = flat_scores
    return out


def zscore(scores: np.ndarray) -> np.ndarray:
    """Standardize each row over its finite entries (pads stay ``-inf``)."""
    finite = np.isfinite(scores)
    s = np.where(finite, scores, np.nan)
    mean = np.nanmean(s, axis=1, keepdims=True)
    std = np.nanstd(s, axis=1, keepdims=True)
    return np.where(finite, (s - mean) / np.where(std > 0, std, 1.0), -np.inf)


def mlp_ensemble(cached: CachedTeacher, seeds: list[int]) -> list:
    """Train the pipeline's MLP teacher with other seeds; rows of each and of their z-mean."""
    k, base = cached.k, cached.base
    rows, members = [], [zscore(cached.scores)]
    for seed in seeds:
        run = train_against_cached(cached, cached.config.teacher, seed=seed)
        rows.append((f"MLP teacher, seed {seed}", f"epoch {run.best_epoch}", run.per.mean, run.ci))
        print(f"MLP seed {seed}: valid {run.per.mean:.4f} {run.ci}")
        members.append(zscore(run.scores))
        mean = np.mean(members, axis=0)
        per_e = pipeline_per_user(cached.v_cands, mean, cached.truth, k)
        ci_e = paired_bootstrap(per_e, base)
        rows.append((f"mean z of {len(members)} MLP teachers", "-", per_e.mean, ci_e))
        print(f"ensemble of {len(members)}: valid {per_e.mean:.4f} {ci_e}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pipeline")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--trees", type=int, default=600, help="most trees (chosen on valid)")
    parser.add_argument("--leaves", type=int, default=31)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="teacher_variants")
    parser.add_argument(
        "--drop", nargs="*", default=[], help="leave out columns whose name starts with these"
    )
    parser.add_argument("--min-leaf", type=int, default=50)
    parser.add_argument(
        "--mlp-seeds", type=int, nargs="*", default=[], help="also train MLP teachers (ensemble)"
    )
    args = parser.parse_args()
    import lightgbm as lgb

    cached = load_cached_teacher(args.config)
    if cached is None:
        return 1
    k, mlp, base = cached.k, cached.scores, cached.base
    feats, labels = cached.feats, cached.labels
    v_cands, v_feats, v_labels = cached.v_cands, cached.v_feats, cached.v_labels
    truth = cached.truth

    rows = [("MLP teacher (cached)", "-", base.mean, None)]
    if args.mlp_seeds:
        rows += mlp_ensemble(cached, args.mlp_seeds)
    if args.drop:
        feats, v_feats = drop_columns(feats, args.drop), drop_columns(v_feats, args.drop)
    x, y, group = flat(feats, labels)
    vx, vy, vgroup = flat(v_feats, v_labels)  # valid lists with a positive (early stop)
    vx_all, _, _ = flat(v_feats)
    print(
        f"train rows {len(x)} lists {len(group)} features {x.shape[1]}; MLP valid {base.mean:.4f}"
    )
    for seed in args.seeds:  # LightGBM seeds (none: only the MLP ensemble)
        started = time.perf_counter()
        params = {
            "objective": "lambdarank",
            "learning_rate": args.lr,
            "num_leaves": args.leaves,
            "min_data_in_leaf": args.min_leaf,
            "bagging_fraction": 0.8,
            "bagging_freq": 1,
            "feature_fraction": 0.5,
            "lambda_l2": 1.0,
            "lambdarank_truncation_level": 20,
            "eval_at": [k],
            "seed": seed,
            "num_threads": args.threads,
            "verbose": -1,
        }
        train_set = lgb.Dataset(x, y, group=group)
        valid_set = lgb.Dataset(vx, vy, group=vgroup, reference=train_set)
        model = lgb.train(
            params,
            train_set,
            num_boost_round=args.trees,
            valid_sets=[valid_set],
            callbacks=[lgb.early_stopping(50, verbose=False)],
        )
        trees = model.best_iteration or args.trees
        gb = scatter(v_feats, model.predict(vx_all, num_iteration=trees))
        took = time.perf_counter() - started
        per = pipeline_per_user(v_cands, gb, truth, k)
        ci = paired_bootstrap(per, base)
        rows.append((f"LightGBM lambdarank, seed {seed}", f"{trees} trees", per.mean, ci))
        print(f"seed {seed}: {trees} trees in {took:.0f} s, valid {per.mean:.4f} {ci}")
        for w in (0.25, 0.5, 1.0):
            blend = zscore(mlp) + w * zscore(gb)
            per_b = pipeline_per_user(v_cands, blend, truth, k)
            ci_b = paired_bootstrap(per_b, base)
            rows.append((f"MLP z + {w} x LightGBM z, seed {seed}", "-", per_b.mean, ci_b))
            print(f"  blend w={w}: valid {per_b.mean:.4f} {ci_b}")

    lines = [
        "# Teacher variants on validation (issue 15)",
        "",
        f"`bench/teacher_variants.py --config {args.config}`; LightGBM {lgb.__version__}, "
        f"{args.leaves} leaves, learning rate {args.lr}, min {args.min_leaf} rows a leaf, "
        f"columns left out: {', '.join(args.drop) or 'none'}; trees chosen on validation NDCG@{k} "
        "(early stop, patience 50). Pipeline NDCG@10 on the validation view (943 users); "
        "the interval is the row minus the cached MLP teacher, paired over users.",
        "",
        "| teacher | chosen on valid | valid NDCG@10 | minus MLP teacher [95% CI] |",
        "|---|---|---|---|",
    ]
    for name, chosen, mean, ci in rows:
        diff = "-" if ci is None else f"{ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]"
        lines.append(f"| {name} | {chosen} | {mean:.4f} | {diff} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
