"""Would refitting the two-tower on train + valid help the test view? Measured on validation only.

At test time the pipeline's two-tower (the candidates, ``retrieval_score`` and the embedding
features) is trained on the training part while EASE and the feature tables read train +
valid. A refit on every validation interaction leaves nothing to validate it on, so this
measures it on halves of the validation users (issue 15, idea "refit on train + valid after
selection"), as ``bench/refit_valid.py`` does for the teacher: half A is held out; a two-tower
is trained on the training interactions plus half B's validation interactions, with the
pipeline's ``[two_tower]`` config and seed for the epoch count the cached two-tower chose on
validation (no early stop: the refit rule); its vectors are rotated onto the cached model's
item vectors (``procrustes_align``, as the training folds' two-towers are), a FAISS index is
built over them with ``[index]``, and A's validation lists are mined and featurized again
(the feature tables read the training items, as now). The cached teacher and the served int8
ranker of the step cache score them, and they are compared, paired over A's users, with the
cached validation lists (the train-only two-tower); ``--held both`` swaps the halves too.

A control trains the train-only two-tower again through the same code (same epochs, seed):
it must give the cached lists back, which checks this path against the pipeline's.
``--seeds 0 1`` repeats both with other two-tower seeds (each refit beside the train-only
model of its own seed), for the spread a single seed hides.

Reads the steps of ``slimrank pipeline --config CONFIG`` (``make demo``) from the step cache::

    .venv/bin/python bench/refit_two_tower.py [--config pipeline] [--held both] [--seeds 0]

Writes ``bench/results/refit_two_tower.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimrank.compression.scorer import onnx_score_fn  # noqa: E402
from slimrank.data.dataset import Interactions  # noqa: E402
from slimrank.evaluation.paired import PerUser, paired_bootstrap  # noqa: E402
from slimrank.pipeline.artifacts import (  # noqa: E402
    VIEWS,
    CandidatesArtifact,
    DataArtifact,
    EmbeddingsArtifact,
    IndexArtifact,
    Int8Artifact,
    TeacherArtifact,
    TwoTowerArtifact,
)
from slimrank.pipeline.config import load_config, resolve_config  # noqa: E402
from slimrank.pipeline.engine import LocalEngine  # noqa: E402
from slimrank.pipeline.run import cached_step_paths  # noqa: E402
from slimrank.pipeline.steps import sample_users  # noqa: E402
from slimrank.ranking.candidates import Candidates  # noqa: E402
from slimrank.ranking.features import CandidateFeatures, build_feature_tables  # noqa: E402
from slimrank.ranking.pipeline_eval import pipeline_metrics, pipeline_per_user  # noqa: E402
from slimrank.ranking.teacher import teacher_scores  # noqa: E402
from slimrank.ranking.train import procrustes_align  # noqa: E402
from slimrank.retrieval.embeddings import export_embeddings, history_for  # noqa: E402
from slimrank.retrieval.index import build_index  # noqa: E402
from slimrank.retrieval.train import train_two_tower  # noqa: E402

RESULTS = HERE / "results"
SYSTEMS = ("retrieval alone", "teacher", "served int8")


@dataclasses.dataclass(frozen=True)
class Lists:
    """One two-tower's validation lists, scored by each system, and its candidate recall."""

    cands: Candidates
    scores: dict[str, np.ndarray]  # system -> (U, N)
    candidate_recall: float


def with_valid_of(data: DataArtifact, users: np.ndarray) -> Interactions:
    """Return the training interactions plus the validation interactions of ``users``."""
    split = data.split
    keep = np.isin(split.valid.user, users)
    return Interactions(
        *(
            np.concatenate([getattr(split.train, f), getattr(split.valid, f)[keep]])
            for f in ("user", "item", "rating", "timestamp")
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pipeline")
    parser.add_argument("--seed", type=int, default=0, help="seed of the halves")
    parser.add_argument("--held", choices=("A", "B", "both"), default="both", help="held out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="two-tower seeds")
    parser.add_argument("--out", default="refit_two_tower.md", help="name under bench/results")
    args = parser.parse_args()
    config = load_config(resolve_config(args.config))
    paths = cached_step_paths(config)
    for step in ("two_tower", "embeddings", "index", "candidates", "teacher", "int8"):
        if not paths[step].is_dir():
            print(f"{paths[step]}: no {step} step; run slimrank pipeline --config {args.config}")
            return 1
    data = DataArtifact.load(paths["data"])
    cached = TwoTowerArtifact.load(paths["two_tower"])
    emb = EmbeddingsArtifact.load(paths["embeddings"])
    cached_index = IndexArtifact.load(paths["index"]).index
    v_cands, v_feats, _ = CandidatesArtifact.load(paths["candidates"]).views["valid"]
    teacher = TeacherArtifact.load(paths["teacher"]).model
    served = onnx_score_fn(Int8Artifact.load(paths["int8"]).ranker)
    split, k, cc = data.split, config.k, config.candidates
    truth = data.truth("valid")
    observed, times = data.seen("valid"), data.seen_times("valid")
    epochs = int(cached.metrics["best_epoch"])
    model_config = cached.model.config
    valid_history = history_for(split, "valid", model_config.max_history)

    def score(cands: Candidates, feats: CandidateFeatures) -> Lists:
        scores = {
            "retrieval alone": cands.retrieval_score,
            "teacher": teacher_scores(teacher, feats),
            "served int8": served(feats),
        }
        recall = pipeline_metrics(cands, cands.retrieval_score, truth, (k,))["candidate_recall"]
        return Lists(cands, scores, recall)

    def mine(user_vecs: np.ndarray, item_vecs: np.ndarray, index) -> tuple:
        """The validation view's lists, mined as ``candidates_step`` mines them."""
        tables = build_feature_tables(
            observed,
            user_vecs,
            item_vecs,
            data.user_features,
            data.item_features,
            cc.features,
            time=times,
        )
        users = sample_users(truth, cc.eval_users, cc.fold_seed, VIEWS.index("valid") + 1000)
        cands, feats, _ = LocalEngine().mine(tables, user_vecs, index, users, cc.n, observed, truth)
        return cands, feats

    def two_tower_lists(extra_users: np.ndarray, seed: int) -> Lists:
        """Train on train + ``extra_users``' validation items, re-embed, re-mine, score."""
        started = time.perf_counter()
        train = dataclasses.replace(
            config.two_tower.train, epochs=epochs, eval_every=epochs, seed=seed, progress=False
        )
        fit_split = dataclasses.replace(split, train=with_valid_of(data, extra_users))
        model = train_two_tower(
            model_config, train, fit_split, data.user_features, data.item_features
        ).model
        user, item = export_embeddings(model, valid_history, data.user_features, data.item_features)
        rot = procrustes_align(item, emb.item)
        user, item = (user @ rot).astype(np.float32), (item @ rot).astype(np.float32)
        pick = np.random.default_rng(config.index.seed).choice(
            len(user), min(len(user), config.index.tuning.n_queries), replace=False
        )
        index = build_index(item, config.index, tune_queries=user[np.sort(pick)], progress=False)
        lists = score(*mine(user, item, index))
        print(
            f"two-tower seed {seed} + {len(extra_users)} users' valid items: "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        return lists

    # The path check: the cached vectors and index through this bench's mining give the
    # cached validation lists back, feature for feature.
    c_cands, c_feats = mine(emb.user["valid"], emb.item, cached_index)
    same_lists = np.array_equal(c_cands.items, v_cands.items) and np.array_equal(
        c_feats.values, v_feats.values
    )
    print("cached vectors re-mined: identical lists and features:", same_lists, flush=True)
    if not same_lists:
        print("the bench's mining differs from the candidates step's; fix it first")
        return 1
    cached_lists = score(v_cands, v_feats)

    users = v_cands.user
    rng = np.random.default_rng(args.seed)
    half = rng.permutation(len(users)) < len(users) // 2
    helds = {"A": [("A", half)], "B": [("B", ~half)], "both": [("A", half), ("B", ~half)]}
    helds = helds[args.held]

    def per_user(lists: Lists, held: np.ndarray, system: str) -> PerUser:
        return pipeline_per_user(lists.cands.take(held), lists.scores[system][held], truth, k)

    lines = [
        "# Two-tower refit on train + valid, measured on held-out validation halves (ml-100k)",
        "",
        f"Two-tower: `[two_tower]` of `{args.config}`, {epochs} epochs (the cached model's "
        f"best epoch on validation), no early stop; vectors rotated onto the cached model's "
        f"item vectors; `[index]` rebuilt over them. Halves of the {len(users)} validation "
        f"users, seed {args.seed}. Scored by the cached teacher and the served int8 ranker of "
        "the step cache (not retrained). Each row: NDCG@10 on the held-out half, paired "
        "bootstrap 95% interval over its users (10,000 resamples).",
        "",
    ]
    control_rows = []
    rows = []
    pairs: dict[tuple[str, str], list[tuple[PerUser, PerUser]]] = {}
    for seed in args.seeds:
        base = two_tower_lists(np.zeros(0, np.int64), seed)
        if seed == config.two_tower.train.seed:
            for system in SYSTEMS:
                a = per_user(base, np.ones(len(users), bool), system)
                b = per_user(cached_lists, np.ones(len(users), bool), system)
                ci = paired_bootstrap(a, b)
                control_rows.append(
                    f"| {system} | {b.values.mean():.4f} | {a.values.mean():.4f} "
                    f"| {ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] |"
                )
            control_rows.append(
                f"| candidate recall@{cc.n} | {cached_lists.candidate_recall:.4f} "
                f"| {base.candidate_recall:.4f} | - |"
            )
        for name, held in helds:
            refit = two_tower_lists(users[~held], seed)
            for system in SYSTEMS:
                a, b = per_user(refit, held, system), per_user(base, held, system)
                pairs.setdefault((name, system), []).append((a, b))
                ci = paired_bootstrap(a, b)
                rows.append(
                    f"| {seed} | {name} ({int(held.sum())}) | {int((~held).sum())} | {system} "
                    f"| {b.values.mean():.4f} | {a.values.mean():.4f} "
                    f"| {ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] |"
                )
                print(rows[-1], flush=True)
            a_rec = pipeline_metrics(
                refit.cands.take(held), refit.cands.retrieval_score[held], truth, (k,)
            )["candidate_recall"]
            b_rec = pipeline_metrics(
                base.cands.take(held), base.cands.retrieval_score[held], truth, (k,)
            )["candidate_recall"]
            rows.append(
                f"| {seed} | {name} ({int(held.sum())}) | {int((~held).sum())} "
                f"| candidate recall@{cc.n} | {b_rec:.4f} | {a_rec:.4f} | - |"
            )
    if len(args.seeds) > 1:
        # Each user's NDCG averaged over the seeds' models: what refitting gives a model draw
        # on average, with the seed-to-seed noise of the two-tower's training averaged out.
        for (name, system), runs in pairs.items():
            a, b = (
                PerUser(runs[0][i].users, np.mean([r[i].values for r in runs], axis=0))
                for i in (0, 1)
            )
            ci = paired_bootstrap(a, b)
            n_held = len(a.users)
            rows.append(
                f"| mean of {len(runs)} | {name} ({n_held}) | {len(users) - n_held} | {system} "
                f"| {b.values.mean():.4f} | {a.values.mean():.4f} "
                f"| {ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] |"
            )
    if control_rows:
        lines += [
            "Control, all validation users: the train-only two-tower trained again by this "
            "bench (same seed and epochs) against the cached validation lists of the pipeline:",
            "",
            "| system | cached lists | retrained here | difference [95% CI] |",
            "|---|---:|---:|---|",
            *control_rows,
            "",
        ]
    lines += [
        "| two-tower seed | held out (users) | valid users added | system | train only "
        "| train + other half's valid | refit minus train only [95% CI] |",
        "|---:|---|---:|---|---:|---:|---|",
        *rows,
        "",
        f"Command: `.venv/bin/python bench/refit_two_tower.py --config {args.config} "
        f"--held {args.held} --seeds {' '.join(map(str, args.seeds))}`",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
