"""Would the peers' item-item scores help as teacher features? Measured on validation only.

Issue 15, idea (b): RP3beta and item-KNN (the peers of ``slimrank/evaluation/peers.py``, at
the settings validation chose for them) as candidate features. Before building them into
the top-K neighbour tables the server reads, this probes the upper bound: each candidate's
*full* peer score (no top-K cut on the candidate's side), fitted on exactly what the list's
other features read (a training fold's history for the training lists, the training items
for the validation lists), is appended with its log rank within the list, and the
pipeline's MLP teacher is trained again (same config and seed) and compared with the
cached teacher on the validation view: pipeline NDCG@10 and a paired bootstrap interval.

    .venv/bin/python bench/feature_probe.py [--config pipeline] [--peers rp3beta itemknn]

``--recent N``: EASE and co-occurrence over the user's N newest items. ``--sequence-ease W D
B L2``: EASE with neighbours in time (``bench/sequence_ease.py``). ``--rating-ease P L2``:
EASE fitted and scored on rows weighted by rating**P (mean 1; no served system reads rating
values), or with P = 0 the exact EASE at that l2 that the served top-K table approximates.

Writes ``bench/results/feature_probe.md``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.more_peers import fit_user_knn  # noqa: E402
from bench.rating_ease import weighted_rows  # noqa: E402
from bench.sequence_ease import ordered_rows, sequence_ease_weights, window_gram  # noqa: E402
from slimrank.evaluation.baselines import EaseConfig, ease_weights  # noqa: E402
from slimrank.evaluation.paired import paired_bootstrap  # noqa: E402
from slimrank.evaluation.peers import (  # noqa: E402
    fit_als,
    fit_item_knn,
    fit_rp3beta,
    item_knn_weights,
)
from slimrank.pipeline.artifacts import (  # noqa: E402
    CandidatesArtifact,
    DataArtifact,
    EmbeddingsArtifact,
    TeacherArtifact,
)
from slimrank.pipeline.config import load_config, resolve_config  # noqa: E402
from slimrank.pipeline.run import cached_step_paths  # noqa: E402
from slimrank.pipeline.steps import train_pipeline_teacher  # noqa: E402
from slimrank.ranking.features import CandidateFeatures  # noqa: E402
from slimrank.ranking.pipeline_eval import pipeline_per_user  # noqa: E402
from slimrank.ranking.teacher import teacher_scores  # noqa: E402

RESULTS = HERE / "results"
# The settings the peers' validation grid chose (README, Evaluation protocol).
PEERS = {
    "rp3beta": (fit_rp3beta, {"alpha": 0.75, "beta": 0.6, "k": 400}),
    "itemknn": (fit_item_knn, {"k": 200, "shrink": 10.0}),
    # Not a peer of the README's table: user-based neighbours, a view no item-item column
    # gives (k and shrink chosen on validation alone: 0.2325 NDCG@10, EASE 0.2596).
    "userknn": (fit_user_knn, {"k": 50, "shrink": 0.0}),
    # implicit's ALS, 25 settings tried on validation (fitted on train): 0.2616 NDCG@10 here.
    "als": (fit_als, {"factors": 64, "regularization": 30.0, "alpha": 3.0, "iterations": 15}),
}


def peer_columns(observed: sp.csr_matrix, users: np.ndarray, items: np.ndarray, name: str):
    """Return ``(U, N, 2)``: the peer's score of each candidate and its log1p rank in the list."""
    fit, params = PEERS[name]
    return with_rank(fit(observed, params)(users), items)


def newest(observed: sp.csr_matrix, times: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """Return ``observed`` with each row cut to its ``n`` newest items (by ``times``)."""
    x = sp.csr_matrix(observed, dtype=np.float64)
    t = sp.csr_matrix(times)
    rows, cols = [], []
    for u in range(x.shape[0]):
        items = x.indices[x.indptr[u] : x.indptr[u + 1]]
        when = np.asarray(t[u, items].todense()).ravel() if len(items) else items
        keep = items[np.argsort(-when, kind="stable")[:n]]
        rows.append(np.full(len(keep), u))
        cols.append(keep)
    r, c = np.concatenate(rows), np.concatenate(cols)
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=x.shape)


def recent_columns(observed, times, users, items, n: int) -> np.ndarray:
    """Return ``(U, N, 4)``: EASE (l2 = 250, the tables') and cosine co-occurrence scores over
    the user's ``n`` newest items, each with its log1p rank in the list (weights fitted on the
    whole of ``observed``)."""
    x = sp.csr_matrix(observed, dtype=np.float64)
    x.data[:] = 1.0
    recent = newest(x, times, n)[users]
    ease = ease_weights(x, EaseConfig(l2=250.0))
    cos = item_knn_weights(x, x.shape[1], 0.0)
    parts = [with_rank(np.asarray(recent @ w), items) for w in (ease, cos)]
    return np.concatenate(parts, axis=-1)


def rating_ease_columns(
    observed: sp.csr_matrix, weights: sp.csr_matrix, users, items, l2: float
) -> np.ndarray:
    """Return ``(U, N, 2)``: EASE fitted and scored on rating-weighted rows (``observed``'s
    items with their weights), with its log1p rank in the list."""
    x = sp.csr_matrix(observed, dtype=np.float64)
    x.data[:] = 1.0
    r = sp.csr_matrix(x.multiply(weights))
    return with_rank(np.asarray(r[users] @ ease_weights(r, EaseConfig(l2=l2))), items)


def sequence_ease_columns(
    observed: sp.csr_matrix, times: sp.csr_matrix, users, items, setting: list[float]
) -> np.ndarray:
    """Return ``(U, N, 2)``: EASE with neighbours in time (:mod:`bench.sequence_ease`) fitted
    on ``observed`` ordered by ``times``, with its log1p rank in the list."""
    window, decay, beta, l2 = setting
    gram_w = window_gram(ordered_rows(observed, times), observed.shape[1], int(window), decay)
    x = sp.csr_matrix(observed, dtype=np.float64)
    x.data[:] = 1.0
    weights = sequence_ease_weights(x, gram_w, beta, l2)
    return with_rank(np.asarray(x[users] @ weights), items)


def with_rank(full: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Return ``(U, N, 2)``: ``full`` (U, I) at each candidate, and its log1p rank in the list."""
    real = items >= 0
    score = np.where(real, np.take_along_axis(full, np.maximum(items, 0), axis=1), 0.0)
    ranked = np.where(real, score, -np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(items.shape[1])[None, :], axis=1)
    out = np.stack([score, np.log1p(rank)], axis=-1)
    return np.where(real[..., None], out, 0.0).astype(np.float32)


def widen(feats: CandidateFeatures, extra: np.ndarray, names: tuple[str, ...]):
    values = np.concatenate([feats.values, extra], axis=-1)
    return CandidateFeatures(values, feats.names + names, feats.user, feats.items)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pipeline")
    parser.add_argument("--peers", nargs="*", default=["rp3beta"], choices=sorted(PEERS))
    parser.add_argument(
        "--recent", type=int, default=0, help="EASE and co-occurrence over the N newest items"
    )
    parser.add_argument(
        "--rating-ease",
        type=float,
        nargs=2,
        metavar=("POWER", "L2"),
        help="EASE on rating**POWER weighted rows (mean 1) with this l2, and its rank",
    )
    parser.add_argument(
        "--sequence-ease",
        type=float,
        nargs=4,
        metavar=("WINDOW", "DECAY", "BETA", "L2"),
        help="EASE with neighbours in time (bench/sequence_ease.py), and its rank",
    )
    parser.add_argument("--out", default="feature_probe")
    args = parser.parse_args()
    config = load_config(resolve_config(args.config))
    path = cached_step_paths(config)
    teacher_dir = path["teacher"]
    data = DataArtifact.load(path["data"])
    emb = EmbeddingsArtifact.load(path["embeddings"])
    cands, feats, labels = CandidatesArtifact.load_one(path["candidates"], "train")
    v_cands, v_feats, _ = CandidatesArtifact.load_one(path["candidates"], "valid")
    truth = data.truth("valid")
    k = config.k
    base = pipeline_per_user(
        v_cands, TeacherArtifact.load_scores(teacher_dir)["valid"].astype(np.float64), truth, k
    )
    # The training lists are the folds' lists one after the other (candidates_step).
    fold_users = [np.flatnonzero(np.diff(t.indptr) > 0) for t in emb.target]
    if not np.array_equal(np.concatenate(fold_users), cands.user):
        raise SystemExit("training lists are not the folds' users in order: re-run candidates")
    bounds = np.cumsum([0] + [len(u) for u in fold_users])
    names: tuple[str, ...] = ()
    train_times = data.seen_times("valid")  # a fold's history is part of the training items
    train_extra, valid_extra = [], []

    def add(columns) -> None:
        """Append ``columns(observed, users, items)`` of each fold's training lists (their
        fold's history) and of the validation lists (the training items)."""
        parts = [
            columns(emb.history[i], cands.user[a:b], cands.items[a:b])
            for i, (a, b) in enumerate(itertools.pairwise(bounds))
        ]
        train_extra.append(np.concatenate(parts))
        valid_extra.append(columns(data.seen("valid"), v_cands.user, v_cands.items))

    for peer in args.peers:
        names += (f"{peer}_score", f"{peer}_rank")
        add(lambda observed, users, items, peer=peer: peer_columns(observed, users, items, peer))
    if args.recent:
        n = args.recent
        names += (f"ease_recent{n}", f"ease_recent{n}_rank", f"cooc_recent{n}")
        names += (f"cooc_recent{n}_rank",)
        add(lambda observed, users, items: recent_columns(observed, train_times, users, items, n))
    if args.rating_ease:
        power, l2 = args.rating_ease
        # rating**0 is the binary matrix: the exact, untruncated EASE at that l2.
        name = "ease_full" if power == 0 else f"rating{power:g}_ease"
        names += (name, f"{name}_rank")
        weights = weighted_rows(data.split, power)
        add(lambda observed, users, items: rating_ease_columns(observed, weights, users, items, l2))
    if args.sequence_ease:
        names += ("sequence_ease", "sequence_ease_rank")
        setting = args.sequence_ease
        add(
            lambda observed, users, items: sequence_ease_columns(
                observed, train_times, users, items, setting
            )
        )
    feats = widen(feats, np.concatenate(train_extra, axis=-1), names)
    v_feats = widen(v_feats, np.concatenate(valid_extra, axis=-1), names)
    result = train_pipeline_teacher(config.teacher, k, data, (feats, labels), (v_cands, v_feats))
    scores = teacher_scores(result.model, v_feats).astype(np.float64)
    per = pipeline_per_user(v_cands, scores, truth, k)
    ci = paired_bootstrap(per, base)
    history = [round(h.get(f"valid_ndcg@{k}", float("nan")), 4) for h in result.history]
    lines = [
        "# Peer scores as teacher features, on validation (issue 15)",
        "",
        f"`bench/feature_probe.py --config {args.config} --peers {' '.join(args.peers)} "
        f"--recent {args.recent} --rating-ease {args.rating_ease} "
        f"--sequence-ease {args.sequence_ease}`: "
        f"columns {', '.join(names)} appended; the pipeline's teacher config and seed. "
        "Pipeline NDCG@10 on the validation view; the interval is the row minus the cached "
        "teacher (same features without these columns), paired over users.",
        "",
        "| teacher | chosen on valid | valid NDCG@10 | minus cached teacher [95% CI] |",
        "|---|---|---|---|",
        f"| cached teacher | - | {base.mean:.4f} | - |",
        f"| with {', '.join(names)} | epoch {result.best_epoch} | {per.mean:.4f} | "
        f"{ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] |",
        "",
        f"Validation NDCG@10 by epoch (0: untrained): {history}",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
