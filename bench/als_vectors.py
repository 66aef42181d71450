"""Would ALS's vectors serve the pipeline better than the two-tower's? Validation only.

ALS tuned on ml-100k is the strongest peer (0.2622 validation NDCG@10, the two-tower's
retrieval 0.2433), and across two-tower seeds a better retrieval went with a better served
ranker. So this swaps the vectors every later step reads: the candidates, ``retrieval_score``
and the embedding columns. ALS (``implicit``, the peers' ``fit_als`` settings at
``--factors``, 64 by default so the index keeps its shape) is fitted on the training part;
the validation view's user vectors are its user factors, the test view's are recalculated
on train + valid with the items fixed (the two-tower's test view pools the same). Each
training fold gets its own ALS on the fold's history, rotated onto the main item vectors as
the pipeline rotates its fold two-towers (``procrustes_align``). Every step after the
embeddings then runs again with the pipeline's config, into a scratch step cache, and the
retrieval, the teacher and the served int8 ranker are compared on the validation view with
the cached run's, paired over users. Nothing here reads test labels.

    .venv/bin/python bench/als_vectors.py   # after make demo; about 6 minutes

Writes ``bench/results/als_vectors.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimrank.evaluation.paired import paired_bootstrap  # noqa: E402
from slimrank.evaluation.peers import als_model  # noqa: E402
from slimrank.pipeline.artifacts import DataArtifact, EmbeddingsArtifact  # noqa: E402
from slimrank.pipeline.cache import StepOutput  # noqa: E402
from slimrank.pipeline.comparison import variant_per_user  # noqa: E402
from slimrank.pipeline.config import load_config, resolve_config  # noqa: E402
from slimrank.pipeline.run import cached_step_paths, run_pipeline  # noqa: E402
from slimrank.ranking.train import procrustes_align  # noqa: E402

RESULTS = HERE / "results"
REUSED = ("data", "catalog", "two_tower")
# The rankers compared, by the variant key variant_per_user reads.
RANKERS = {"retrieval": "retrieval alone", "teacher": "teacher fp32", "int8": "served int8"}


def als_embeddings(
    data: DataArtifact, cached: EmbeddingsArtifact, params: dict
) -> EmbeddingsArtifact:
    """Return ``cached`` (its folds) with ALS's item and user vectors in place of the
    two-tower's."""
    from threadpoolctl import threadpool_limits

    main = als_model(data.seen("valid"), params)  # the training part
    item = np.asarray(main.item_factors, np.float32)
    user = {"valid": np.asarray(main.user_factors, np.float32)}
    seen = sp.csr_matrix(data.seen("test"), dtype=np.float32)  # train + valid, binary
    with threadpool_limits(1, "blas"):
        test = main.recalculate_user(np.arange(seen.shape[0]), seen)
    user["test"] = np.asarray(test, np.float32)
    fold_item = []
    for i, history in enumerate(cached.history):
        model = als_model(history, params)
        fold_user = np.asarray(model.user_factors, np.float32)
        fold_vecs = np.asarray(model.item_factors, np.float32)
        rot = procrustes_align(fold_vecs, item)
        user[f"fold{i}"] = (fold_user @ rot).astype(np.float32)
        fold_item.append((fold_vecs @ rot).astype(np.float32))
    return EmbeddingsArtifact(item, user, cached.history, cached.target, fold_item)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pipeline")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--l2", type=float, default=20.0)
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--work", type=Path, default=HERE / ".cache" / "als_vectors")
    args = parser.parse_args()
    config = load_config(resolve_config(args.config))
    paths = cached_step_paths(config)
    missing = [s for s in (*REUSED, "embeddings", "int8") if not paths[s].is_dir()]
    if missing:
        raise SystemExit(f"steps {missing} are not in {config.cache_dir}: run make demo first")
    data = DataArtifact.load(paths["data"])
    params = {
        "factors": args.factors,
        "regularization": args.l2,
        "alpha": args.alpha,
        "iterations": 15,
    }
    tag = f"als-f{args.factors}-l{args.l2:g}-a{args.alpha:g}"
    vectors = args.work / tag
    vectors.mkdir(parents=True, exist_ok=True)
    als_embeddings(data, EmbeddingsArtifact.load(paths["embeddings"]), params).save(vectors)
    provided = {s: StepOutput(s, paths[s].name.rsplit("-", 1)[1], paths[s], True) for s in REUSED}
    provided["embeddings"] = StepOutput("embeddings", tag, vectors, True)
    probe = dataclasses.replace(config, cache_dir=str(args.work / "cache"))
    ours, base = run_pipeline(probe, provided=provided), run_pipeline(config)  # base: cached
    lines = [
        "# ALS's vectors in place of the two-tower's, on validation (issue 15)",
        "",
        f"`bench/als_vectors.py --factors {args.factors} --l2 {args.l2:g} --alpha "
        f"{args.alpha:g}`: ALS (implicit, 15 iterations, `random_state` 0) gives the "
        "candidates, `retrieval_score` and the embedding columns; every later step trained "
        "again with the pipeline's config. Validation NDCG@10, paired over users against the "
        "cached run (the two-tower's vectors).",
        "",
        "| ranker | two-tower vectors | ALS vectors | ALS minus two-tower [95% CI] |",
        "|---|---|---|---|",
    ]
    for key, name in RANKERS.items():
        per, before = variant_per_user(ours, key, "valid"), variant_per_user(base, key, "valid")
        ci = paired_bootstrap(per, before)
        lines.append(
            f"| {name} | {before.mean:.4f} | {per.mean:.4f} | "
            f"{ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "als_vectors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
