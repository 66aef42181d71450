"""IVF over inner product against IVF over the MIPS-to-L2 transform, on a scale run's vectors.

    .venv/bin/python bench/mips_transform.py bench/.cache/scale/cache-1000000u-1000000i-20-oe9c68b9b

The pipeline's index at 1M (``IVF4096,PQ32x4fs,Refine(SQ8)``, inner product) reaches recall@200
0.95 only at ``nprobe`` 1024 of 4,096 lists. This bench measures what would do better, on
held-out test users of the run, one query at a time, against exact search:

- the served index at several ``nprobe`` (``k_factor_rf`` 4, the tuned one);
- an ``IVF4096,Flat`` over the item vectors augmented with ``sqrt(M^2 - |x|^2)`` (``M`` the
  largest item norm; queries get a 0), where the L2 nearest are exactly the largest inner
  products (Bachrach et al., "Speeding up the Xbox recommender system using a euclidean
  transformation for inner-product spaces", RecSys 2014).

It builds nothing the pipeline uses; it reads the run's cached data, embeddings and index.
Writes ``bench/results/mips_transform.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scale_checks import step_dir  # noqa: E402


def recall_and_ms(
    search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, truth: np.ndarray, k: int
) -> tuple[float, float]:
    """Mean recall@k against ``truth`` and mean ms per query, one query at a time."""
    start = time.perf_counter()
    got = [search(q[None])[0] for q in queries]
    ms = (time.perf_counter() - start) / len(queries) * 1000
    recall = np.mean(
        [
            len(set(g[g >= 0].tolist()) & set(t.tolist())) / k
            for g, t in zip(got, truth, strict=True)
        ]
    )
    return float(recall), ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path, help="a scale run's step cache")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    import faiss

    from slimrank.pipeline.artifacts import DataArtifact, EmbeddingsArtifact, IndexArtifact
    from slimrank.retrieval.tuning import apply_params, exact_knn

    k = 200
    split = DataArtifact.load(step_dir(args.cache, "data")).split
    emb = EmbeddingsArtifact.load(step_dir(args.cache, "embeddings"))
    served = IndexArtifact.load(step_dir(args.cache, "index")).index
    xb = np.ascontiguousarray(emb.item, dtype=np.float32)
    rng = np.random.default_rng(12345)
    users = np.sort(rng.choice(np.unique(split.test.user), args.users, replace=False))
    xq = np.ascontiguousarray(emb.user["test"][users], dtype=np.float32)
    _, truth = exact_knn(xq, [xb], k, faiss.METRIC_INNER_PRODUCT)
    norms = np.linalg.norm(xb, axis=1)
    faiss.omp_set_num_threads(1)
    rows = []
    raw = served._index
    for nprobe in (128, 256, 512, 1024):
        apply_params(raw, {"nprobe": nprobe, "k_factor_rf": 4})
        recall, ms = recall_and_ms(lambda q: raw.search(q, k)[1], xq, truth, k)
        rows.append(("served index (inner product)", served.factory_string, nprobe, recall, ms))
    top = float(norms.max())
    extra = np.sqrt(np.maximum(top * top - norms**2, 0.0))[:, None]
    xb2 = np.ascontiguousarray(np.hstack([xb, extra]), dtype=np.float32)
    xq2 = np.ascontiguousarray(np.hstack([xq, np.zeros((len(xq), 1))]), dtype=np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(xb2.shape[1]), xb2.shape[1], 4096)
    start = time.process_time()
    sample = np.random.default_rng(0).choice(len(xb2), min(len(xb2), 4096 * 64), replace=False)
    ivf.train(xb2[sample])
    ivf.add(xb2)
    build_cpu = time.process_time() - start
    for nprobe in (8, 16, 32, 64):
        ivf.nprobe = nprobe
        recall, ms = recall_and_ms(lambda q: ivf.search(q, k)[1], xq2, truth, k)
        rows.append(("MIPS-to-L2 transform", "IVF4096,Flat (d + 1)", nprobe, recall, ms))
    lines = [
        "# IVF over inner product against the MIPS-to-L2 transform",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC} · {os.cpu_count()} cpus · load average "
        f"{[round(x, 2) for x in os.getloadavg()]} · cache `{args.cache}` · {len(xb):,} items, "
        f"{len(users):,} held-out test users, one query at a time, one thread",
        "",
        f"Item vector norms: min {norms.min():.3f}, median {np.median(norms):.3f}, max "
        f"{norms.max():.3f}. Transform index build: {build_cpu:.1f} s CPU.",
        "",
        "| index | factory | nprobe | recall@200 vs exact | ms per query |",
        "|---|---|---:|---:|---:|",
        *[f"| {a} | `{b}` | {c} | {d:.4f} | {e:.3f} |" for a, b, c, d, e in rows],
        "",
        f"Command: `bench/mips_transform.py {args.cache}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        (HERE / "results" / "mips_transform.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
