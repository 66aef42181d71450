"""Retrieval index benchmark: exact vs. IVF-PQ variants on a synthetic or given catalog.

For each variant: build time, bytes per vector (index file size / N), recall@10 and @100
against exact search on held-out queries (with search parameters tuned to recall@100 >= 0.95
on other queries), single-query latency p50/p99 on one thread, and batch throughput.

    .venv/bin/python bench/retrieval.py                 # 1M x 64 synthetic (~16 min here)
    .venv/bin/python bench/retrieval.py --items 100000  # quick run
    .venv/bin/python bench/retrieval.py --embeddings item_emb.npy [--query-embeddings u.npy]

With ``--query-embeddings`` the query pool is split into disjoint tuning and evaluation halves;
without it, catalog items serve as queries.

Timings are wall-clock on whatever machine runs this; on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

from slimrank.data.synthetic import SyntheticConfig, items, queries
from slimrank.retrieval.index import (
    IndexConfig,
    RetrievalIndex,
    build_index,
    coarse_centroids_of,
    tune_index,
)
from slimrank.retrieval.index_io import INDEX_FILE, save_index
from slimrank.retrieval.tuning import TuningConfig, exact_knn, recall_at_k

log = logging.getLogger("bench.retrieval")

RESULTS = Path(__file__).resolve().parent / "results"


def variants(tuning: TuningConfig) -> dict[str, IndexConfig]:
    """Return the index configurations compared, by name, in run order (OPQ, the slowest, last)."""
    base = IndexConfig(threads=1, tuning=tuning)
    pq8 = dataclasses.replace(base, pq_bits=8, fastscan=False, refine="none")
    return {
        "exact (Flat)": dataclasses.replace(base, kind="flat"),
        "IVF-PQ32x4fs + SQ8 (default)": base,
        "IVF-PQ32x4fs (FastScan)": dataclasses.replace(base, refine="none"),
        "IVF-PQ32x4fs + RFlat": dataclasses.replace(base, refine="flat"),
        "IVF-PQ64x4fs (FastScan)": dataclasses.replace(base, pq_m=64, refine="none"),
        "IVF-PQ32x8": pq8,
        "OPQ + IVF-PQ32x8": dataclasses.replace(pq8, opq=True),
    }


def _latency_ms(index: RetrievalIndex, xq: np.ndarray, k: int, rounds: int) -> tuple[float, float]:
    """Return the median over rounds of single-query p50 and p99, in milliseconds."""
    p50s, p99s = [], []
    for _ in range(rounds):
        times = np.empty(len(xq))
        for i in range(len(xq)):
            q = xq[i : i + 1]  # (1, d)
            t0 = time.perf_counter_ns()
            index.search(q, k)
            times[i] = time.perf_counter_ns() - t0
        p50s.append(float(np.percentile(times, 50)) / 1e6)
        p99s.append(float(np.percentile(times, 99)) / 1e6)
    return statistics.median(p50s), statistics.median(p99s)


def _throughput(index: RetrievalIndex, xq: np.ndarray, k: int, rounds: int) -> float:
    """Return the median over rounds of batch queries per second."""
    qps = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        index.search(xq, k)
        qps.append(len(xq) / (time.perf_counter() - t0))
    return statistics.median(qps)


def run_variant(
    name: str,
    config: IndexConfig,
    xb: np.ndarray,
    xq_tune: np.ndarray,
    xq_eval: np.ndarray,
    truth: np.ndarray,
    args: argparse.Namespace,
    centroids: np.ndarray | None,
) -> tuple[dict[str, object], RetrievalIndex]:
    """Build, tune, save and measure one variant; returns its result row and the index.

    With ``centroids`` the IVF k-means is skipped (shared with an earlier variant).
    """
    log.info("=== %s", name)
    faiss.omp_set_num_threads(args.threads)
    untuned = dataclasses.replace(config.tuning, enabled=False)
    t0 = time.perf_counter()
    index = build_index(
        xb,
        dataclasses.replace(config, tuning=untuned),
        progress=False,
        coarse_centroids=centroids,
    )
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # tuning is timed apart from the build
    if config.tuning.enabled and index.factory_string != "Flat":
        index = tune_index(index, xb, xq_tune, config.tuning)
    tune_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        save_index(index, tmp)
        size = (Path(tmp) / INDEX_FILE).stat().st_size
    _, found = index.search(xq_eval, 100)
    flat = index.factory_string == "Flat"
    n_lat = min(args.latency_queries, 200) if flat else args.latency_queries
    rounds = 1 if flat else 3
    p50, p99 = _latency_ms(index, xq_eval[:n_lat], 100, rounds)
    qps = _throughput(index, xq_eval, 100, 1 if flat else 3)
    row = {
        "variant": name,
        "factory_string": index.factory_string,
        "params": index.params,
        "tuned_recall_at_100": None if index.tuning is None else index.tuning.recall,
        "met_target": None if index.tuning is None else index.tuning.met_target,
        "build_s": round(build_s, 2),
        "coarse_kmeans": "-" if flat else ("shared" if centroids is not None else "own"),
        "tune_s": round(tune_s, 2),
        "bytes_per_vector": round(size / index.ntotal, 1),
        "recall_at_10": round(recall_at_k(found, truth, 10), 4),
        "recall_at_100": round(recall_at_k(found, truth, 100), 4),
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "batch_qps": round(qps, 1),
        "latency_queries": n_lat,
    }
    log.info("%s", row)
    return row, index


def to_markdown(meta: dict[str, object], rows: list[dict[str, object]]) -> str:
    """Return the results as a Markdown page with one table."""
    head = (
        "| variant | factory | params | build s | k-means | B/vec | R@10 | R@100 "
        "| p50 ms | p99 ms | qps |\n"
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        params = ", ".join(f"{k}={v:g}" for k, v in r["params"].items()) or "-"
        lines.append(
            f"| {r['variant']} | `{r['factory_string']}` | {params} | {r['build_s']} | "
            f"{r['coarse_kmeans']} | "
            f"{r['bytes_per_vector']} | {r['recall_at_10']} | {r['recall_at_100']} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {r['batch_qps']} |"
        )
    about = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    return f"# Retrieval index benchmark\n\n{about}\n\n{head}" + "\n".join(lines) + "\n"


def _write(meta: dict[str, object], rows: list[dict[str, object]], name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(to_markdown(meta, rows))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic catalog size")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=1_000)
    parser.add_argument("--embeddings", type=Path, help="item embeddings .npy instead")
    parser.add_argument("--query-embeddings", type=Path, help="query/user embeddings .npy")
    parser.add_argument("--metric", choices=("ip", "l2"), default="ip")
    parser.add_argument("--tune-queries", type=int, default=1_000)
    parser.add_argument("--eval-queries", type=int, default=2_000)
    parser.add_argument("--latency-queries", type=int, default=1_000)
    parser.add_argument("--max-nprobe", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="substrings of variant names to run")
    parser.add_argument("--name", default="retrieval", help="results file stem")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)

    meta: dict[str, object] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "faiss": faiss.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "k": 100,
    }
    if args.embeddings is not None:
        xb = np.load(args.embeddings, allow_pickle=False).astype(np.float32)
        rng = np.random.default_rng(0)
        if args.query_embeddings is not None:
            pool = np.load(args.query_embeddings, allow_pickle=False).astype(np.float32)
        else:
            pool = xb  # no queries given: held-out probes are catalog items themselves
        pick = rng.permutation(len(pool))
        n_tune = min(args.tune_queries, len(pool) // 2)
        xq_tune = pool[pick[:n_tune]]
        xq_eval = pool[pick[n_tune : n_tune + args.eval_queries]]
        meta["catalog"] = f"{args.embeddings} ({xb.shape[0]} x {xb.shape[1]})"
        meta["queries"] = str(args.query_embeddings or "catalog items")
    else:
        synth = SyntheticConfig(n_items=args.items, dim=args.dim, n_clusters=args.clusters)
        t0 = time.perf_counter()
        xb = items(synth)
        xq_tune = queries(synth, args.tune_queries, stream=0)
        xq_eval = queries(synth, args.eval_queries, stream=1)
        log.info("generated %s in %.1f s", xb.shape, time.perf_counter() - t0)
        meta["catalog"] = f"synthetic {synth.to_dict()}"
    meta["queries_tune_eval"] = f"{len(xq_tune)} / {len(xq_eval)} (disjoint)"
    faiss.omp_set_num_threads(args.threads)
    metric = faiss.METRIC_INNER_PRODUCT if args.metric == "ip" else faiss.METRIC_L2
    t0 = time.perf_counter()
    _, truth = exact_knn(xq_eval, [xb], 100, metric)
    log.info("exact ground truth in %.1f s", time.perf_counter() - t0)

    nprobe = tuple(v for v in TuningConfig().nprobe if v <= args.max_nprobe)
    tuning = TuningConfig(n_queries=args.tune_queries, nprobe=nprobe)
    meta["tuning"] = (
        f"fastest of nprobe {nprobe}, k_factor {tuning.k_factor} with recall@100 >= 0.95"
    )
    meta["build"] = (
        "build_s = train + add on one thread; variants marked 'shared' reuse the default's "
        "IVF centroids, so their build_s excludes the coarse k-means"
    )
    rows: list[dict[str, object]] = []
    centroids = None
    for name, config in variants(tuning).items():
        if args.only and not any(s.lower() in name.lower() for s in args.only):
            continue
        config = dataclasses.replace(config, metric=args.metric, threads=args.threads)
        share = centroids if (config.kind == "ivfpq" and not config.opq) else None
        try:
            row, index = run_variant(name, config, xb, xq_tune, xq_eval, truth, args, share)
        except ValueError as err:  # e.g. pq_m=64 does not divide a 32-dim catalog
            log.warning("skipping %s: %s", name, err)
            continue
        rows.append(row)
        if centroids is None and share is None and index.factory_string.startswith("IVF"):
            centroids = coarse_centroids_of(index)
        _write(meta, rows, args.name)  # after every variant, so a long run keeps partial results
    sys.stdout.write(to_markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
