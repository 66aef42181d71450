"""HTTP/JSON under load from two code trees in alternation: latency when it keeps up, and
whether a burst it cannot keep up with is shed (429) or queued.

    .venv/bin/python bench/http_shedding.py --a old=../wt-old --b new=. --pairs 3

Each tree is a checkout of slimrank (``git worktree add ../wt-old <rev>``); its ``slimrank
serve --http-port 0`` runs in that directory, as ``bench/serving_ab.py`` runs its servers,
with the CLI's defaults otherwise (model calls on the event loop). Per run, one aiohttp
client on its own event loop, in this process:

1. ``--rate`` ``POST /v1/recommend`` per second for ``--seconds``, open loop (Poisson
   arrivals drawn in advance, latency from the scheduled send): p50 and p99 of the answers;
2. then ``--burst`` calls sent at once: how many were answered (200) and refused (429), and
   the answered ones' p50 and slowest.

The calls are for known users of the bundle (``CURRENT`` of ``--bundles``, read only).
Pair i runs one tree and then the other, the order alternating from pair to pair. Writes
``bench/results/http_shedding_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serving import ROOT, ServerProcess, cpu_features
from serving_ab import add_tree_args, alternating, check_trees, cpu_line

HTTP_READY = re.compile(r"\bhttp (\S+):(\d+)")


def known_users(bundles: Path, n: int = 200) -> list[str]:
    """``n`` random known user ids of the bundle (seeded)."""
    from slimrank.bundle import open_bundle
    from slimrank.serving.loader import load_snapshot

    users = load_snapshot(open_bundle(bundles)).user_ids
    pick = np.random.default_rng(1).integers(0, len(users), size=n)
    return [str(users[u]) for u in pick]


async def _post(session: Any, url: str, user: str) -> tuple[int, float]:
    start = time.perf_counter()
    async with session.post(url, json={"user_id": user, "k": 10}) as response:
        await response.read()
        return response.status, time.perf_counter() - start


async def drive(url: str, users: list[str], rate: float, seconds: float, burst: int, seed: int):
    """Run the open-loop phase, then the burst; return both phases' figures."""
    import aiohttp

    rng = np.random.default_rng(seed)
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds)))
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _post(session, url, users[0])  # one warm-up call
        t0 = time.perf_counter()

        async def scheduled(i: int, at: float) -> tuple[int, float]:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            status, _ = await _post(session, url, users[i % len(users)])
            return status, time.perf_counter() - (t0 + at)  # from the scheduled send

        steady = await asyncio.gather(*(scheduled(i, at) for i, at in enumerate(offsets)))
        burst_results = await asyncio.gather(
            *(_post(session, url, users[i % len(users)]) for i in range(burst))
        )
    ok = [1000 * s for code, s in steady if code == 200]
    burst_ok = [1000 * s for code, s in burst_results if code == 200]
    return {
        "steady_calls": len(steady),
        "steady_answered": len(ok),
        "steady_refused": sum(code == 429 for code, _ in steady),
        "steady_p50_ms": round(float(np.percentile(ok, 50)), 2) if ok else None,
        "steady_p99_ms": round(float(np.percentile(ok, 99)), 2) if ok else None,
        "burst_answered": len(burst_ok),
        "burst_refused": sum(code == 429 for code, _ in burst_results),
        "burst_other": sum(code not in (200, 429) for code, _ in burst_results),
        "burst_p50_ms": round(float(np.percentile(burst_ok, 50)), 1) if burst_ok else None,
        "burst_max_ms": round(max(burst_ok), 1) if burst_ok else None,
    }


def one_run(label: str, tree: Path, args: argparse.Namespace, users: list[str], seed: int):
    """Serve the bundle from ``tree``, drive it, return the run's figures."""
    argv = [sys.executable, "-m", "slimrank.cli", "serve", "--bundles", str(args.bundles)]
    argv += ["--port", "0", "--metrics-port", "0", "--http-port", "0", "--poll-interval", "0"]
    server = ServerProcess(argv, code=tree)
    try:
        match = HTTP_READY.search(server.ready_line)
        if match is None:
            raise RuntimeError(f"{label}: no http address in {server.ready_line!r}")
        url = f"http://{match[1]}:{match[2]}/v1/recommend"
        figures = asyncio.run(drive(url, users, args.rate, args.seconds, args.burst, seed))
        shed = server.counter_by("slimrank_shed_requests_total", "reason")
    finally:
        server.stop()
    return {
        "variant": label,
        "pair": seed,
        **figures,
        "shed_by_reason": shed,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# HTTP/JSON shedding: {' vs '.join(report['variants'])}",
        "",
        f"`{report['command']}`",
        "",
        f"Bundle `{report['bundles']}`; per run {report['rate']:g} calls/s for "
        f"{report['seconds']:g} s (open loop), then {report['burst']} calls at once; "
        f"`slimrank serve` defaults otherwise. CPU: {cpu_line(report['cpu'])}. Trees: "
        + ", ".join(f"{k} `{v}`" for k, v in report["trees"].items())
        + ".",
        "",
        "| variant | pair | steady answered / refused | steady p50 / p99 ms | burst answered /"
        " refused / other | burst p50 / slowest ms | load |",
        "|---|---:|---|---|---|---|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['variant']} | {r['pair']} | {r['steady_answered']} / {r['steady_refused']} | "
            f"{r['steady_p50_ms']} / {r['steady_p99_ms']} | {r['burst_answered']} / "
            f"{r['burst_refused']} / {r['burst_other']} | {r['burst_p50_ms']} / "
            f"{r['burst_max_ms']} | {r['load_average_1m']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_tree_args(parser)
    parser.add_argument("--rate", type=float, default=50.0, help="steady calls/s (50)")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady phase (10 s)")
    parser.add_argument("--burst", type=int, default=500, help="calls sent at once (500)")
    parser.add_argument("--pairs", type=int, default=3, help="alternated pairs of runs (3)")
    parser.add_argument("--name", default="s33", help="results file suffix")
    args = parser.parse_args()
    check_trees(parser, args)
    if args.rate <= 0 or args.seconds <= 0 or args.burst < 1 or args.pairs < 1:
        parser.error("--rate and --seconds must be > 0, --burst and --pairs >= 1")
    (a, tree_a), (b, tree_b) = args.a, args.b
    users = known_users(args.bundles)
    runs = []
    for pair in range(args.pairs):
        for label, tree in alternating(pair, args.a, args.b):
            runs.append(one_run(label, tree, args, users, pair))
            print(json.dumps(runs[-1]), flush=True)
    report = {
        "command": "bench/http_shedding.py " + shlex.join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "variants": [a, b],
        "trees": {a: str(tree_a), b: str(tree_b)},
        "bundles": str(args.bundles),
        "rate": args.rate,
        "seconds": args.seconds,
        "burst": args.burst,
        "cpu": cpu_features(),
        "runs": runs,
    }
    text = markdown(report)
    print(text)
    out = ROOT / "bench" / "results" / f"http_shedding_{args.name}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(f"wrote {out}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
