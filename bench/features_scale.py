"""Candidate-feature cost against catalog scale: the same featurizer at 10k, 100k and 1M.

For each scale a synthetic world of ``n`` users and ``n`` items is drawn: Zipf item popularity,
users in taste clusters (so items co-occur as in real logs), geometric history lengths with
mean ``--per-user``, and timestamps. The feature tables are built with the production
builders (:func:`slimrank.ranking.features.build_feature_tables`, cached under
``bench/.cache/features_scale`` with the build time it took; one
:class:`~slimrank.ranking.features.FeatureConfig` for every scale, EASE by local ridge
regressions so that 1M items build), then one request's features are timed the way the server
computes them (:class:`~slimrank.serving.featurizer.RequestFeaturizer`): a known user, 200
distinct candidates, one thread, interleaved across scales call by call so that machine noise
hits every scale alike.

    .venv/bin/python bench/features_scale.py                    # 10k, 100k, 1M (minutes)
    .venv/bin/python bench/features_scale.py --scales 10000,100000 --calls 500

Writes ``bench/results/features_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimrank.ranking.feature_io import load_tables, save_tables  # noqa: E402
from slimrank.ranking.features import FeatureConfig, build_feature_tables  # noqa: E402
from slimrank.serving.featurizer import RequestFeaturizer  # noqa: E402
from slimrank.serving.snapshot import Retrieved, UserQuery, UserSource  # noqa: E402

RESULTS = HERE / "results"
CACHE = HERE / ".cache" / "features_scale"
DIM = 64
N_CANDIDATES = 200
CONFIG = FeatureConfig(ease_method="local")


def cpu_flags() -> str:
    """The CPU's model and SIMD flags, as ``bench/serving.py`` reads them, on one line."""
    from bench.serving import cpu_features

    cpu = cpu_features()
    return f"{cpu['model'] or 'unknown CPU'}; " + " ".join(cpu["flags"])


def synthetic_world(n: int, per_user: float, seed: int = 0) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Return ``(observed, times)`` ``(n, n)``: clustered users over Zipf-popular items."""
    rng = np.random.default_rng(seed)
    n_clusters = max(8, int(np.sqrt(n) / 4))
    item_cluster = rng.integers(0, n_clusters, n)
    popularity = 1.0 / np.arange(1, n + 1) ** 0.9
    rng.shuffle(popularity)
    lengths = np.minimum(rng.geometric(1.0 / per_user, n), n // 2)
    users = np.repeat(np.arange(n), lengths)
    # Half of each user's items from their cluster, half from the whole catalog.
    order = np.argsort(item_cluster, kind="stable")
    starts = np.searchsorted(item_cluster[order], np.arange(n_clusters + 1))
    user_cluster = rng.integers(0, n_clusters, n)[users]
    total = len(users)
    global_pick = rng.choice(n, total, p=popularity / popularity.sum())
    lo, hi = starts[user_cluster], starts[user_cluster + 1]
    local_pick = order[np.minimum(lo + (rng.random(total) * (hi - lo)).astype(np.int64), n - 1)]
    items = np.where(rng.random(total) < 0.5, local_pick, global_pick)
    stamps = rng.integers(1, 10**9, total).astype(np.float64)
    observed = sp.csr_matrix((np.ones(total, np.float32), (users, items)), shape=(n, n))
    observed.data[:] = 1.0
    times = sp.csr_matrix((stamps, (users, items)), shape=(n, n))  # duplicates summed: still > 0
    return observed, times


def build(n: int, per_user: float) -> dict[str, Any]:
    """Build (or load from ``bench/.cache/features_scale``) one world's tables."""
    t0 = time.perf_counter()
    observed, times = synthetic_world(n, per_user)
    world_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    digest = hashlib.sha256(json.dumps([n, per_user, CONFIG.to_dict()]).encode()).hexdigest()
    cached = CACHE / f"{n}-{digest[:16]}"
    t0 = time.perf_counter()
    if (cached / "layout.json").is_file():
        layout = json.loads((cached / "layout.json").read_text())
        tables = load_tables(cached / "tables.safetensors", layout, vecs, vecs)
        build_s = float(layout["build_seconds"])
    else:
        tables = build_feature_tables(observed, vecs, vecs, config=CONFIG, time=times)
        build_s = time.perf_counter() - t0
        cached.mkdir(parents=True, exist_ok=True)
        layout = save_tables(cached / "tables.safetensors", tables)
        layout["build_seconds"] = build_s
        (cached / "layout.json").write_text(json.dumps(layout))
    lengths = tables.history.lengths
    users = rng.integers(0, n, 600)
    requests = []
    for u in users:
        rows = rng.choice(n, N_CANDIDATES, replace=False).astype(np.int64)
        scores = np.sort(rng.standard_normal(N_CANDIDATES).astype(np.float32))[::-1].copy()
        query = UserQuery(UserSource.KNOWN, int(u), tables.user_vecs[u])
        requests.append((query, Retrieved(rows, scores)))
    return {
        "tables": tables,
        "featurize": RequestFeaturizer(tables),
        "requests": requests,
        "info": {
            "users": n,
            "items": n,
            "interactions": int(observed.nnz),
            "history_mean": float(lengths.mean()),
            "history_p99": float(np.percentile(lengths, 99)),
            "history_max": int(lengths.max()),
            "world_seconds": round(world_s, 1),
            "build_seconds": round(build_s, 1),
            "cooc_entries": int(tables.cooc.lengths.sum()),
            "ease_entries": 0 if tables.ease is None else int(tables.ease.lengths.sum()),
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    scales = [int(s) for s in args.scales.split(",")]
    load_before = [round(x, 2) for x in os.getloadavg()]
    worlds = {}
    for n in scales:
        worlds[n] = build(n, args.per_user)
        print(f"{n:>9,}: built {worlds[n]['info']}", file=sys.stderr, flush=True)
    times = {n: np.empty(args.calls) for n in scales}
    for n in scales:  # warm-up
        for query, retrieved in worlds[n]["requests"][:50]:
            worlds[n]["featurize"](query, retrieved)
    for i in range(args.calls):
        for n in scales:  # interleaved: every scale sees the same machine noise
            query, retrieved = worlds[n]["requests"][i % len(worlds[n]["requests"])]
            t0 = time.perf_counter()
            worlds[n]["featurize"](query, retrieved)
            times[n][i] = time.perf_counter() - t0
    rows = []
    base = float(np.median(times[scales[0]]))
    for n in scales:
        ms = times[n] * 1000
        rows.append(
            {
                **worlds[n]["info"],
                "p50_ms": round(float(np.median(ms)), 4),
                "p99_ms": round(float(np.percentile(ms, 99)), 4),
                "p50_over_smallest": round(float(np.median(times[n])) / base, 3),
            }
        )
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {cpu_flags()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "config": CONFIG.to_dict(),
        "candidates": N_CANDIDATES,
        "calls": args.calls,
        "rows": rows,
        "command": shlex.join(sys.argv),
    }


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# Candidate features against catalog scale",
        "",
        f"{report['date']} · {report['machine']} · numpy {report['numpy']} · load average "
        f"before/after {report['loadavg_before']} / {report['loadavg_after']}",
        "",
        f"One request: a known user, {report['candidates']} distinct candidates, one thread; "
        f"{report['calls']} calls per scale, interleaved. history_cap {cfg['history_cap']}, "
        f"cooc_neighbors {cfg['cooc_neighbors']}, ease_neighbors {cfg['ease_neighbors']} "
        f"(local ridge over {cfg['ease_local_neighbors']}), {DIM}-d vectors.",
        "",
        "| users = items | interactions | history mean / p99 / max | build s | p50 ms | p99 ms "
        "| p50 / smallest |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['users']:,} | {r['interactions']:,} | {r['history_mean']:.1f} / "
            f"{r['history_p99']:.0f} / {r['history_max']} | {r['build_seconds']} | "
            f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['p50_over_smallest']:.2f}x |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="10000,100000,1000000", help="users = items")
    parser.add_argument("--per-user", type=float, default=20.0, help="mean history length")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per scale")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    report = run(args)
    text = markdown(report)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "features_scale.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "features_scale.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
