"""Does retrieval hide EASE's hits from the ranker? ml-100k, the pipeline's own candidates.

The ranker can only reorder the ``n`` candidates the FAISS index returns. If EASE (the
strongest peer) found relevant items that retrieval misses, a second candidate source would
be worth its cost; if not, the gap to EASE is in the ranking. For each view (validation:
EASE fitted on train; test: on train + valid, the equal-information input of
``observed_interactions``), with EASE at the l2 validation chose for the peer (500):

- EASE's top-10 hits (relevant items in its full-ranking top 10) and how many of them are not
  among the user's retrieved candidates;
- EASE's NDCG@10 when it may only reorder the candidates, against its full-ranking NDCG@10.

Reads the candidates step of ``slimrank pipeline --config pipeline`` from the step cache (run
the pipeline first; ``make demo`` does)::

    .venv/bin/python bench/candidate_recall.py [--config pipeline]

Writes ``bench/results/candidate_recall.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimrank.evaluation.metrics import ranking_metrics  # noqa: E402
from slimrank.evaluation.peers import fit_ease, observed_interactions, truth_of  # noqa: E402
from slimrank.evaluation.protocol import rank_users  # noqa: E402
from slimrank.pipeline.artifacts import DataArtifact, load_view  # noqa: E402
from slimrank.pipeline.config import load_config, resolve_config  # noqa: E402
from slimrank.pipeline.run import cached_step_paths  # noqa: E402
from slimrank.ranking.pipeline_eval import pipeline_metrics  # noqa: E402

RESULTS = HERE / "results"
EASE_L2 = 500.0  # the EASE peer's setting chosen on validation (README, Evaluation protocol)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pipeline")
    args = parser.parse_args()
    config = load_config(resolve_config(args.config))
    paths = cached_step_paths(config)
    cand_dir, data_dir = paths["candidates"], paths["data"]
    if not (cand_dir / "test.safetensors").exists():
        print(f"{cand_dir}: no candidates step; run slimrank pipeline --config {args.config}")
        return 1
    split = DataArtifact.load(data_dir).split
    lines = [
        "# EASE's hits among the retrieved candidates (ml-100k, seed 2020)",
        "",
        f"EASE l2 = {EASE_L2:g}; candidates: the pipeline's {config.candidates.n} per user "
        "(two-tower + IVF-PQ), the observed items excluded.",
        "",
        "| view | users | EASE top-10 hits | hits not retrieved | EASE NDCG@10, full ranking "
        "| EASE NDCG@10, reordering the candidates | candidate recall |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for view in ("valid", "test"):
        cands, _, _ = load_view(cand_dir / f"{view}.safetensors")
        observed, truth = observed_interactions(split, view), truth_of(split, view)
        score = fit_ease(observed, {"l2": EASE_L2})
        users = cands.user
        top = rank_users(score, users, observed, 10)  # (U, 10)
        relevant = truth[users].toarray() > 0
        hit = np.take_along_axis(relevant, np.maximum(top, 0), axis=1) & (top >= 0)
        retrieved = (top[:, :, None] == cands.items[:, None, :]).any(axis=2)
        full = ranking_metrics(top, truth[users], (10,))["ndcg@10"]
        within = np.take_along_axis(score(users), np.maximum(cands.items, 0), axis=1)
        m = pipeline_metrics(cands, np.where(cands.mask, within, -np.inf), truth, (10,))
        missed = int((hit & ~retrieved).sum())
        lines.append(
            f"| {view} | {len(users)} | {int(hit.sum())} | {missed} ({missed / hit.sum():.1%}) "
            f"| {full:.4f} | {m['ndcg@10']:.4f} | {m['candidate_recall']:.4f} |"
        )
    lines += ["", f"Command: `.venv/bin/python bench/candidate_recall.py --config {args.config}`"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "candidate_recall.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
