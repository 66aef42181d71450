"""Checks on a finished ``make bench-scale`` run's step cache (no pipeline step is re-run).

- ``recall``: the tuned index's recall@200 against exact search on held-out users: test-view
  user vectors of users with a test interaction, outside the 2,000 the index step tuned on.
- ``evaluation``: the CPU of the two-tower step's sampled full-ranking evaluation
  (``evaluate_model``, 2,000 users) on the run's model, valid and test, with its metrics
  beside the ones the step saved (they must agree).
- ``scores``: the candidates step's retrieval order on valid and test (the index's own
  scores) against the same candidates ordered by their exact inner products: what the
  index's score error costs retrieval alone (and the rankers' ``retrieval_score`` feature).
- ``leak``: NDCG@10 of single features (the retrieval score, EASE, co-occurrence,
  popularity) on the training lists (the sampled users' target folds as truth) and on the
  valid view's lists: a feature that ranks the training lists far better, relative to the
  others, than it ranks valid's has seen the training labels.

    nice -n 19 .venv/bin/python bench/scale_checks.py recall \
        bench/.cache/scale/cache-1000000u-1000000i-20-oe9c68b9b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def step_dir(cache: Path, step: str) -> Path:
    """Return the one cached output of ``step`` under ``cache``."""
    found = sorted(cache.glob(f"{step}-*"))
    if len(found) != 1:
        raise SystemExit(f"{cache}: expected one {step}-* directory, found {len(found)}")
    return found[0]


def held_out_recall(cache: Path, n_users: int = 2000, k: int = 200) -> dict[str, Any]:
    """Return the index's recall@k against exact search on ``n_users`` held-out users."""
    import faiss

    from slimrank.pipeline.artifacts import DataArtifact, EmbeddingsArtifact, IndexArtifact
    from slimrank.retrieval.index import IndexConfig
    from slimrank.retrieval.tuning import exact_knn

    split = DataArtifact.load(step_dir(cache, "data")).split
    emb = EmbeddingsArtifact.load(step_dir(cache, "embeddings"))
    index_dir = step_dir(cache, "index")
    index = IndexArtifact.load(index_dir).index
    config = IndexConfig.from_dict(
        json.loads((index_dir / "step.json").read_text())["config"]["index"]
    )
    queries = emb.user["test"]
    # The index step's own pick (index_step: seed, n_queries) is left out.
    rng = np.random.default_rng(config.seed)
    tuned = rng.choice(len(queries), min(len(queries), config.tuning.n_queries), False)
    pool = np.setdiff1d(np.unique(split.test.user), tuned)
    users = np.sort(np.random.default_rng(12345).choice(pool, n_users, replace=False))
    xq = np.ascontiguousarray(queries[users], dtype=np.float32)
    cpu = time.process_time()
    _, got = index.search(xq, k)
    search_cpu = time.process_time() - cpu
    cpu = time.process_time()
    _, truth = exact_knn(xq, [emb.item], k, faiss.METRIC_INNER_PRODUCT)
    exact_cpu = time.process_time() - cpu
    recall = np.mean(
        [
            len(set(g[g >= 0].tolist()) & set(t.tolist())) / k
            for g, t in zip(got, truth, strict=True)
        ]
    )
    return {
        "held_out_users": len(users),
        f"recall@{k}": round(float(recall), 4),
        "params": index.params,
        "search_cpu_s": round(search_cpu, 1),
        "exact_cpu_s": round(exact_cpu, 1),
    }


def evaluation_cost(cache: Path, max_users: int = 2000) -> dict[str, Any]:
    """Return the CPU seconds and metrics of the two-tower step's sampled evaluation."""
    from slimrank.pipeline.artifacts import DataArtifact, TwoTowerArtifact
    from slimrank.retrieval.train import evaluate_model

    data = DataArtifact.load(step_dir(cache, "data"))
    two_tower = TwoTowerArtifact.load(step_dir(cache, "two_tower"))
    model, saved = two_tower.model, two_tower.metrics
    out: dict[str, Any] = {}
    for view in ("valid", "test"):
        cpu = time.process_time()
        got = evaluate_model(model, data.split, view, ks=(10,), max_users=max_users)
        out[view] = {
            "cpu_s": round(time.process_time() - cpu, 1),
            "ndcg@10": got["ndcg@10"],
            "saved_ndcg@10": saved[view]["ndcg@10"],
            "same_as_saved": all(got[m] == saved[view][m] for m in got),
        }
    return out


def score_error(cache: Path) -> dict[str, Any]:
    """Return NDCG@10 of the candidates by the index's scores and by exact inner products."""
    from slimrank.pipeline.artifacts import DataArtifact, EmbeddingsArtifact, load_view
    from slimrank.ranking.pipeline_eval import pipeline_metrics

    data = DataArtifact.load(step_dir(cache, "data"))
    emb = EmbeddingsArtifact.load(step_dir(cache, "embeddings"))
    out: dict[str, Any] = {}
    for view in ("valid", "test"):
        cands, _, _ = load_view(step_dir(cache, "candidates") / f"{view}.safetensors")
        ok = cands.items >= 0
        items = np.where(ok, cands.items, 0)
        exact = np.einsum("ud,und->un", emb.user[view][cands.user], emb.item[items])
        exact = np.where(ok, exact, -np.inf).astype(np.float32)  # (U, N)
        err = np.abs(cands.retrieval_score - exact)[ok]
        truth = data.truth(view)
        out[view] = {
            "ndcg@10 by the index's scores": pipeline_metrics(cands, cands.retrieval_score, truth)[
                "ndcg@10"
            ],
            "ndcg@10 by exact inner products": pipeline_metrics(cands, exact, truth)["ndcg@10"],
            "score error max": float(err.max()),
            "score error mean": float(err.mean()),
        }
    return out


LEAK_FEATURES = ("retrieval_score", "ease_score", "cooc_sum", "item_log_popularity")


def feature_leak(cache: Path) -> dict[str, Any]:
    """Return NDCG@10 of ranking each view's lists by one feature alone, per feature."""
    from slimrank.pipeline.artifacts import DataArtifact, EmbeddingsArtifact, load_view
    from slimrank.ranking.pipeline_eval import pipeline_metrics

    data = DataArtifact.load(step_dir(cache, "data"))
    target = EmbeddingsArtifact.load(step_dir(cache, "embeddings")).target[0]
    out: dict[str, Any] = {}
    for view, truth in (("train", target), ("valid", data.truth("valid"))):
        cands, feats, _ = load_view(step_dir(cache, "candidates") / f"{view}.safetensors")
        ok = cands.items >= 0
        row: dict[str, float] = {}
        for name in LEAK_FEATURES:
            score = np.where(ok, feats.values[..., feats.names.index(name)], -np.inf)
            row[name] = round(pipeline_metrics(cands, score, truth)["ndcg@10"], 4)
        row["users"] = len(cands.user)
        out[view] = row
    out["train / valid"] = {
        name: round(out["train"][name] / out["valid"][name], 3) for name in LEAK_FEATURES
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("recall", "evaluation", "scores", "leak"))
    parser.add_argument("cache", type=Path, help="the run's step cache (bench/.cache/scale/...)")
    args = parser.parse_args()
    fn = {
        "recall": held_out_recall,
        "evaluation": evaluation_cost,
        "scores": score_error,
        "leak": feature_leak,
    }[args.check]
    print(json.dumps(fn(args.cache), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
