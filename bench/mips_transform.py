"""IVF over inner product against IVF over the MIPS-to-L2 transform, on a scale run's vectors.

    .venv/bin/python bench/mips_transform.py bench/.cache/scale/cache-1000000u-1000000i-20-oe9c68b9b

The pipeline's index at 1M (``IVF4096,PQ32x4fs,Refine(SQ8)``, inner product) reaches recall@200
0.95 only at ``nprobe`` 1024 of 4,096 lists. This bench measures what would do better, on
held-out test users of the run, one query at a time, against exact search:

- the served index at several ``nprobe`` (``k_factor_rf`` 4, the tuned one);
- an ``IVF4096,Flat`` over the item vectors augmented with ``sqrt(M^2 - |x|^2)`` (``M`` the
  largest item norm; queries get a 0), where the L2 nearest are exactly the largest inner
  products (Bachrach et al., "Speeding up the Xbox recommender system using a euclidean
  transformation for inner-product spaces", RecSys 2014; ``slimrank/retrieval/mips.py``);
- ``--factories``: FAISS factories over the same transformed vectors (IVF-PQ with a refine,
  OPQ, SQ8, Flat), each tuned by the pipeline's tuner (``slimrank/retrieval/tuning.py``) to
  recall@200 >= 0.95 and >= 0.99 on 1,000 other test users, then measured on the held-out
  ones: recall against exact inner-product search, ms per query, bytes per vector.

It builds nothing the pipeline uses; it reads the run's cached data, embeddings and index.
Writes ``bench/results/mips_transform.md``.

``--pipeline CONFIG`` instead runs a pipeline config (e.g. ``pipeline``, ml-100k) through its
candidates step with its own index, with ``index.transform = "mips_l2"``, and with an IVF-Flat
over the transform (a step cache in ``bench/.cache/mips_<config>``), and compares the tuned
index, its recall@200 on the valid view's users against exact search, and the candidates'
recall and retrieval NDCG@10 on valid (``bench/results/mips_transform_<config>.md``).
"""

from __future__ import annotations

import argparse
import contextlib
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


def emit(lines: list[str], path: Path, save: bool) -> int:
    """Print a results table's lines and, with ``save``, write them to ``path``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if save:
        path.write_text(text)
    return 0


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


# Over d + 1 = 65 dims: the pipeline's plan pads to a multiple of pq_m (Pad96 for pq_m 32).
FACTORIES = (
    "IVF4096,Flat",
    "Pad96,IVF4096,PQ32x4fs,Refine(SQ8)",
    "Pad96,IVF4096,PQ48x4fs,Refine(SQ8)",
    "Pad96,IVF4096,PQ32x4fs,RFlat",
    "Pad96,OPQ32,IVF4096,PQ32x4fs,Refine(SQ8)",
    "IVF4096,SQ8",
)


def factory_rows(
    factories: list[str],
    xb2: np.ndarray,
    tune_q: tuple[np.ndarray, np.ndarray],
    test_q: tuple[np.ndarray, np.ndarray],
    k: int,
) -> list[tuple]:
    """Build each factory over the transformed items, tune it, measure it on held-out users.

    ``tune_q`` / ``test_q``: (transformed queries (Q, d + 1), exact inner-product top-k).
    The IVF k-means is trained once and its centroids reused (not with OPQ).
    """
    import faiss

    from slimrank.retrieval.tuning import TuningConfig, tune

    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(xb2), min(len(xb2), 4096 * 64), replace=False))
    xt = np.ascontiguousarray(xb2[sample])
    coarse = faiss.IndexFlatL2(xb2.shape[1])
    kmeans = faiss.Clustering(xb2.shape[1], 4096)
    kmeans.seed = 0
    kmeans.train(xt, coarse)
    centroids = coarse.reconstruct_n(0, 4096)  # (4096, d + 1)
    rows = []
    for factory in factories:
        index = faiss.index_factory(xb2.shape[1], factory, faiss.METRIC_L2)
        start = time.process_time()
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and "OPQ" not in factory:
            pad = np.zeros((4096, ivf.d), np.float32)
            pad[:, : centroids.shape[1]] = centroids
            ivf.quantizer.add(pad)  # FAISS skips the IVF k-means when the lists exist
        index.train(xt)
        index.add(xb2)
        build = time.process_time() - start
        size = faiss.serialize_index(index).nbytes / len(xb2)
        for target in (0.95, 0.99):
            config = TuningConfig(recall_k=k, target=target, n_queries=len(tune_q[0]))
            result = tune(index, tune_q[0], tune_q[1], config)
            recall, ms = recall_and_ms(
                lambda q, index=index: index.search(q, k)[1], test_q[0], test_q[1], k
            )
            params = ", ".join(f"{n} {v:g}" for n, v in result.params.items())
            rows.append((factory, size, build, target, params, recall, ms))
            print(rows[-1], flush=True)
    return rows


class _Stop(Exception):
    pass


def pipeline_rows(config_name: str) -> tuple[list[tuple], str]:
    """Run ``config_name`` through candidates per index variant; return rows and a norm line."""
    import dataclasses

    import faiss

    from slimrank.pipeline.artifacts import EmbeddingsArtifact, IndexArtifact, load_metrics
    from slimrank.pipeline.config import load_config
    from slimrank.pipeline.run import run_pipeline
    from slimrank.retrieval.tuning import exact_knn

    base = load_config(config_name)
    cache = HERE / ".cache" / f"mips_{Path(config_name).stem}"
    base = dataclasses.replace(base, cache_dir=str(cache))
    variants = {
        f"the config's ({base.index.kind}, transform {base.index.transform})": base.index,
        f"{base.index.kind} + mips_l2": dataclasses.replace(base.index, transform="mips_l2"),
        "ivfflat + mips_l2": dataclasses.replace(base.index, kind="ivfflat", transform="mips_l2"),
    }
    rows, norms = [], ""
    for label, index_config in variants.items():
        paths: dict[str, Path] = {}

        def hook(name: str, output, seconds, paths=paths) -> None:
            if output is not None:
                paths[name] = output.path
                if name == "candidates":
                    raise _Stop

        with contextlib.suppress(_Stop):  # stopped after the candidates step, on purpose
            run_pipeline(dataclasses.replace(base, index=index_config), hook)
        index = IndexArtifact.load(paths["index"]).index
        emb = EmbeddingsArtifact.load(paths["embeddings"])
        xq = np.ascontiguousarray(emb.user["valid"], dtype=np.float32)
        _, truth = exact_knn(xq, [emb.item], 200, faiss.METRIC_INNER_PRODUCT)
        _, got = index.search(xq, 200)
        recall = np.mean(
            [
                len(set(g[g >= 0].tolist()) & set(t.tolist())) / 200
                for g, t in zip(got, truth, strict=True)
            ]
        )
        valid = load_metrics(paths["candidates"])["valid"]
        tuned = index.tuning.recall if index.tuning else float("nan")
        params = ", ".join(f"{n} {v:g}" for n, v in index.params.items()) or "-"
        rows.append(
            (
                label,
                index.factory_string,
                params,
                tuned,
                float(recall),
                valid["candidate_recall"],
                valid[f"ndcg@{base.k}"],
            )
        )
        print(rows[-1], flush=True)
        n = np.linalg.norm(emb.item, axis=1)
        norms = f"min {n.min():.3f}, median {np.median(n):.3f}, max {n.max():.3f}"
    return rows, norms


def pipeline_main(config_name: str, save: bool) -> int:
    rows, norms = pipeline_rows(config_name)
    name = Path(config_name).stem
    lines = [
        f"# The MIPS-to-L2 transform in the `{name}` pipeline, through its candidates step",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC} · {os.cpu_count()} cpus · load average "
        f"{[round(x, 2) for x in os.getloadavg()]} · item vector norms: {norms}",
        "",
        "Recall@200 against exact inner-product search on every valid-view user vector "
        "(the index is tuned on test-view ones); candidate recall and NDCG@10 of the "
        "retrieval order on the candidates step's valid view.",
        "",
        "| index | factory | tuned params | tuning recall@200 | valid recall@200 "
        "| valid candidate recall | valid retrieval NDCG@10 |",
        "|---|---|---|---:|---:|---:|---:|",
        *[
            f"| {a} | `{b}` | {c} | {d:.4f} | {e:.4f} | {f:.4f} | {g:.4f} |"
            for a, b, c, d, e, f, g in rows
        ],
        "",
        f"Command: `bench/mips_transform.py --pipeline {config_name}`",
    ]
    return emit(lines, HERE / "results" / f"mips_transform_{name}.md", save)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path, nargs="?", help="a scale run's step cache")
    parser.add_argument("--pipeline", default="", help="a pipeline config to run instead")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument(
        "--factories",
        default=";".join(FACTORIES),
        help="';'-separated FAISS factories over the d + 1 transformed vectors ('' for none)",
    )
    args = parser.parse_args()
    if args.pipeline:
        return pipeline_main(args.pipeline, not args.no_save)
    if args.cache is None:
        parser.error("give a scale run's step cache, or --pipeline CONFIG")
    import faiss

    from slimrank.pipeline.artifacts import DataArtifact, EmbeddingsArtifact, IndexArtifact
    from slimrank.retrieval.mips import augment_items, augment_queries, max_norm
    from slimrank.retrieval.tuning import apply_params, exact_knn

    k = 200
    split = DataArtifact.load(step_dir(args.cache, "data")).split
    emb = EmbeddingsArtifact.load(step_dir(args.cache, "embeddings"))
    served = IndexArtifact.load(step_dir(args.cache, "index")).index
    xb = np.ascontiguousarray(emb.item, dtype=np.float32)
    rng = np.random.default_rng(12345)
    pool = np.unique(split.test.user)
    both = rng.choice(pool, 2 * args.users, replace=False)
    users = np.sort(both[: args.users])
    xq = np.ascontiguousarray(emb.user["test"][users], dtype=np.float32)
    _, truth = exact_knn(xq, [xb], k, faiss.METRIC_INNER_PRODUCT)
    tune_users = np.sort(both[args.users :])  # other test users, for the tuner
    tune_xq = np.ascontiguousarray(emb.user["test"][tune_users], dtype=np.float32)
    _, tune_truth = exact_knn(tune_xq, [xb], k, faiss.METRIC_INNER_PRODUCT)
    norms = np.linalg.norm(xb, axis=1)
    faiss.omp_set_num_threads(1)
    rows = []
    raw = served._index
    for nprobe in (128, 256, 512, 1024):
        apply_params(raw, {"nprobe": nprobe, "k_factor_rf": 4})
        recall, ms = recall_and_ms(lambda q: raw.search(q, k)[1], xq, truth, k)
        rows.append(("served index (inner product)", served.factory_string, nprobe, recall, ms))
    xb2 = augment_items(xb, max_norm(xb))
    xq2 = augment_queries(xq)
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
    factories = [f for f in args.factories.split(";") if f]
    tuned = factory_rows(factories, xb2, (augment_queries(tune_xq), tune_truth), (xq2, truth), k)
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
        "Factories over the transformed vectors (d + 1 = 65; PQ factories pad to 96), each "
        f"tuned by `slimrank/retrieval/tuning.py` to the target on {len(tune_users):,} other "
        f"test users and measured on the {len(users):,} held-out ones, one query at a time, "
        "one thread. Bytes per vector: the serialized index (codes, ids, centroids, "
        "refine codes) over the item count. Build CPU: training and adding, without the IVF "
        "k-means, which is trained once and shared (OPQ trains its own, in rotated space). "
        "Where the recall is under the target, the tuner found no setting that met it and kept "
        "the most accurate one FAISS's `ParameterSpace.explore` left on its Pareto front.",
        "",
        "| factory | bytes/vector | build CPU s | tuned to | params | recall@200 | ms/query |",
        "|---|---:|---:|---:|---|---:|---:|",
        *[
            f"| `{f}` | {b:.0f} | {c:.1f} | {t} | {p} | {r:.4f} | {m:.3f} |"
            for f, b, c, t, p, r, m in tuned
        ],
        "",
        f"Command: `bench/mips_transform.py {args.cache}`",
    ]
    emit(lines, HERE / "results" / "mips_transform.md", not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
