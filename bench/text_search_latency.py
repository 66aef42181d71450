"""Text search latency on ``make demo``'s ml-100k bundle: in process, and served at 200 calls/s.

1. **In process**: the server's own stage (:func:`slimrank.serving.text_search.search_text`)
   on the snapshot ``slimrank serve`` loads, p50 / p99 per query kind, with and without a user.
2. **Served**: ``slimrank serve --bundles ... --port 0`` (one process, one handler thread,
   the defaults), driven open loop by ``bench/loadgen.py`` (``bench/serving.py``'s generator:
   Poisson arrivals, pre-serialized requests, latency from the scheduled send) with Search
   requests made of the evaluation's queries (known-item first word / prefix / typo and genre
   names; half name a user); ``--rate`` calls/s for ``--seconds``. The goal: p99 <= 10 ms at
   200/s. The machine is shared: the load average is recorded before and after, and the same
   load of known users' Recommend calls runs right after, to show what the machine allowed.

    .venv/bin/python bench/text_search_latency.py [--bundles runs/demo/bundles]

Writes ``bench/results/text_search_latency.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import drive, job_for  # noqa: E402
from bench.serving import ServerProcess, cpu_features, grpc_code  # noqa: E402
from bench.text_search import known_item_queries  # noqa: E402

SEARCH = "/slimrank.v1.Recommender/Search"
RECOMMEND = "/slimrank.v1.Recommender/Recommend"
RESULTS = HERE / "results"


def queries(snapshot: Any, n: int, seed: int) -> list[tuple[str, str, str]]:
    """Return ``n`` ``(kind, text, user id or "")`` drawn from titles and genre names."""
    rng = np.random.default_rng(seed)
    catalog = snapshot.catalog
    _, labels = catalog.attributes.multi_label["genre"]
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        user = str(snapshot.user_ids[rng.integers(len(snapshot.user_ids))]) if len(out) % 2 else ""
        if rng.random() < 0.25:
            out.append(("genre", labels[rng.integers(len(labels))].lower(), user))
            continue
        made = known_item_queries(str(catalog.titles[rng.integers(catalog.n_items)]), rng)
        for kind, text in made.items():
            out.append((kind, text, user))
    return out[:n]


def pct(ms: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def in_process(snapshot: Any, qs: list[tuple[str, str, str]]) -> dict[str, Any]:
    from slimrank.serving.text_search import TextSearchConfig, search_text

    cfg = TextSearchConfig()
    times: dict[str, list[float]] = {}
    for kind, text, user in qs:
        t0 = time.perf_counter()
        query = snapshot.user_query(user, [])
        search_text(snapshot, query, text, 10, cfg)
        ms = (time.perf_counter() - t0) * 1000
        key = f"{kind} {'user' if user else 'no user'}"
        times.setdefault(key, []).append(ms)
        times.setdefault("all", []).append(ms)
    return {key: {**pct(np.asarray(v)), "calls": len(v)} for key, v in sorted(times.items())}


def served(
    bundles: Path,
    qs: list[tuple[str, str, str]],
    rate: float,
    seconds: float,
    method: str,
    workers: int = 1,
    handler_threads: int | None = None,
) -> dict:
    """Serve the bundle and drive ``method`` (Search by text, or Recommend for comparison)."""

    from slimrank.serving.proto.slimrank.v1 import recommender_pb2

    if method == SEARCH:
        requests = [
            recommender_pb2.SearchRequest(text=text, k=10, user_id=user).SerializeToString()
            for _, text, user in qs
        ]
    else:  # the same users, every call a known user's Recommend
        users = [user for _, _, user in qs if user]
        requests = [
            recommender_pb2.RecommendRequest(user_id=u, k=10).SerializeToString() for u in users
        ]
    argv = [str(ROOT / ".venv" / "bin" / "slimrank"), "serve", "--bundles", str(bundles)]
    argv += ["--workers", str(workers)]
    if handler_threads is not None:
        argv += ["--handler-threads", str(handler_threads)]
    server = ServerProcess([*argv, "--port", "0", "--metrics-port", "0", "--poll-interval", "0"])
    try:
        n = int(rate * seconds)
        job = job_for(server.target, method, requests, rate, n)
        before = [round(x, 2) for x in os.getloadavg()]
        out = drive(job, seconds + 120)
        after = [round(x, 2) for x in os.getloadavg()]
        latency = (out["done"] - out["schedule"]) * 1000
        codes = out["codes"]
    finally:
        server.stop()
    ok = codes == 0
    return {
        "offered_per_s": rate,
        "calls": n,
        "ok": int(ok.sum()),
        "refused": int((codes == grpc_code("RESOURCE_EXHAUSTED")).sum()),
        "other_errors": int((~ok & (codes != grpc_code("RESOURCE_EXHAUSTED"))).sum()),
        **pct(latency[ok]),
        "max_ms": float(latency[ok].max()),
        "loadavg_before": before,
        "loadavg_after": after,
    }


def main() -> int:
    from slimrank.bundle import open_bundle
    from slimrank.serving.loader import load_snapshot

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=Path, default=ROOT / "runs" / "demo" / "bundles")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--calls", type=int, default=2000, help="in-process calls")
    p.add_argument("--workers", type=int, default=1, help="slimrank serve --workers")
    p.add_argument(
        "--handler-threads", type=int, default=None, help="slimrank serve --handler-threads"
    )
    args = p.parse_args()
    bundle = open_bundle(args.bundles)
    snapshot = load_snapshot(bundle)
    qs = queries(snapshot, args.calls, seed=0)
    report = {
        "bundle": bundle.version,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_features(),
        "in_process": in_process(snapshot, qs),
        "workers": args.workers,
        "handler_threads": args.handler_threads,
        "served": served(
            args.bundles, qs, args.rate, args.seconds, SEARCH, args.workers, args.handler_threads
        ),
        # Recommend right after, on the same server build and rate: what the machine allows now.
        "served_recommend": served(
            args.bundles, qs, args.rate, args.seconds, RECOMMEND, args.workers, args.handler_threads
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "text_search_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "text_search_latency.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict[str, Any]) -> str:
    s, rec = r["served"], r["served_recommend"]
    lines = [
        f"# Text search latency (`bench/text_search_latency.py`, bundle {r['bundle']})",
        "",
        f"{r['date']}; CPU {r['cpu'].get('model', '?')}; shared 2-core machine.",
        "",
        f"**Served** (`slimrank serve --workers {r.get('workers', 1)}"
        + ("" if r.get("handler_threads") is None else f" --handler-threads {r['handler_threads']}")
        + "`, open loop "
        f"{s['offered_per_s']:.0f} calls/s, "
        f"{s['calls']} calls, load average {s['loadavg_before']} before, "
        f"{s['loadavg_after']} after): p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, "
        f"max {s['max_ms']:.1f} ms; {s['refused']} refused, {s['other_errors']} other errors.",
        "",
        f"**Recommend, for comparison** (known users, the same server and rate, right after; "
        f"load average {rec['loadavg_before']} before, {rec['loadavg_after']} after): "
        f"p50 {rec['p50_ms']:.2f} ms, p99 {rec['p99_ms']:.2f} ms, max {rec['max_ms']:.1f} ms; "
        f"{rec['refused']} refused, {rec['other_errors']} other errors.",
        "",
        "**In process** (the stage alone, k = 10, 200 candidates):",
        "",
        "| queries | calls | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for key, v in r["in_process"].items():
        lines.append(f"| {key} | {v['calls']} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
