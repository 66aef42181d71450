"""Serving latency under open-loop load, against the real server in a subprocess.

Send times are scheduled in advance (Poisson arrivals at a fixed rate) and kept whatever the
responses do, so a slow server shows up as latency rather than as a lower request rate
(latency is measured from the scheduled send time). Each run is bounded in calls and time,
on loopback only. Targets:

* ``synthetic``: a 1M x 64 synthetic catalog (``slimrank.data.synthetic``) behind the default
  IVF-PQ + SQ8-refine index of ``slimrank.retrieval.index`` (tuned to recall@100 >= 0.95),
  200 candidates, features ``[item, user * item, user . item, log1p(popularity)]`` (130
  floats) scored by a small MLP (64, 32; random weights) exported to ONNX, dynamic-int8
  quantized and run by the real :class:`~slimrank.compression.scorer.Scorer`. Built once and
  cached under ``bench/.cache/serving/`` as a real bundle; served by ``serve_one`` /
  ``serve_workers`` (``--workers``) with a bench-only loader kind.
* ``ml100k``: ``runs/demo/bundles`` through ``slimrank serve``, when it exists and its kind
  is loadable (skipped with a message otherwise).
* the floor: a gRPC echo server (same payload sizes, same process layout) under the same
  load, and in this process a bare FAISS search and a bare feature + ranker forward.

    .venv/bin/python bench/serving.py             # 1M items, 10 s per rate (index build: minutes)
    .venv/bin/python bench/serving.py --quick     # 100k items, 3 s per rate

Writes ``bench/results/serving.{json,md}``. The machine's load average is recorded beside the
numbers: on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache" / "serving"
RESULTS = HERE / "results"
DEMO_BUNDLES = ROOT / "runs" / "demo" / "bundles"
KIND = "bench_ivf_mlp"
DIM = 64
N_USERS = 10_000
N_CANDIDATES = 200
K = 10
HIDDEN = (64, 32)
READY = re.compile(r"serving on (\S+):(\d+) metrics (\S+) pids ([\d,]+)")
RECOMMEND = "/slimrank.v1.Recommender/Recommend"
ECHO = "/bench.Echo/Echo"

log = logging.getLogger("bench.serving")


# -- the synthetic bundle ------------------------------------------------------------------


def n_features(dim: int) -> int:
    """Features per candidate: item (d), user * item (d), user . item, log1p(popularity)."""
    return 2 * dim + 2


def build_synthetic_bundle(root: Path, n_items: int) -> str:
    """Publish (once; cached) the synthetic bundle under ``root``; return its version."""
    from slimrank.bundle import current_version, publish

    if current_version(root) is not None:
        return str(current_version(root))
    import tempfile

    import torch

    from slimrank.bundle.formats import write_json, write_npy
    from slimrank.compression.export import export_onnx
    from slimrank.compression.quantize import quantize_onnx_dynamic
    from slimrank.data.synthetic import SyntheticConfig, items, queries
    from slimrank.ranking.mlp import MLPConfig, MLPRanker
    from slimrank.retrieval.index import IndexConfig, build_index
    from slimrank.retrieval.index_io import save_index

    config = SyntheticConfig(n_items=n_items, dim=DIM)
    t0 = time.perf_counter()
    xb = items(config)  # (N, d)
    users = queries(config, N_USERS, stream=1)  # (U, d), held out from tuning
    log.info("catalog %d x %d in %.1f s", n_items, DIM, time.perf_counter() - t0)
    t0 = time.perf_counter()
    index = build_index(xb, IndexConfig(threads=2), tune_queries=queries(config, 1000, stream=0))
    log.info("built %s in %.1f s", index.factory_string, time.perf_counter() - t0)
    torch.manual_seed(0)
    model = MLPRanker(MLPConfig(input_dim=n_features(DIM), hidden=HIDDEN)).eval()
    popularity = np.random.default_rng(0).zipf(1.5, n_items).astype(np.float32)  # (N,)

    def write(directory: Path) -> None:
        save_index(index, directory / "index")
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(model, Path(tmp) / "ranker_fp32.onnx", n_features(DIM))
            quantize_onnx_dynamic(fp32, directory / "ranker.onnx")
        write_npy(directory / "items.npy", xb)
        write_npy(directory / "popularity.npy", popularity)
        write_npy(directory / "user_vectors.npy", users)
        write_json(directory / "serving.json", {"kind": KIND, "n_items": n_items})

    version = publish(root, write, config={"n_items": n_items, "dim": DIM, "hidden": HIDDEN})
    log.info("published %s under %s", version, root)
    return version


def load_synthetic(bundle: Any) -> Any:
    """Loader of the bench kind: IVF-PQ retrieval, numpy features, ONNX int8 ranker."""
    import faiss

    from slimrank.bundle.formats import read_npy
    from slimrank.compression.scorer import Scorer
    from slimrank.retrieval.index_io import load_index
    from slimrank.serving.loader import bundle_metadata
    from slimrank.serving.snapshot import ModelSnapshot

    index = load_index(bundle.path / "index")
    # One thread per query: concurrency comes from the server's threads (built with 2).
    faiss.omp_set_num_threads(1)
    items = read_npy(bundle.file("items.npy"))  # (N, d)
    users = read_npy(bundle.file("user_vectors.npy"))  # (U, d)
    popularity = read_npy(bundle.file("popularity.npy"))  # (N,)
    log_pop = np.log1p(popularity).astype(np.float32)  # (N,)
    scorer = Scorer(bundle.file("ranker.onnx"), bundle.manifest.files["ranker.onnx"].sha256)
    featurize = Featurizer(items, log_pop)
    return ModelSnapshot(
        version=bundle.version,
        item_ids=np.char.add("i", np.arange(len(items)).astype(str)),
        item_vectors=items,
        user_ids=np.char.add("u", np.arange(len(users)).astype(str)),
        user_vectors=users,
        popularity=popularity,
        search=index.search,
        featurize=featurize,
        score=scorer.score,
        metadata=bundle_metadata(bundle),
    )


@dataclasses.dataclass(frozen=True)
class Featurizer:
    """``[item, user * item, user . item, log1p(popularity)]`` per candidate: (m, 2d + 2)."""

    items: np.ndarray  # (N, d) float32
    log_popularity: np.ndarray  # (N,) float32

    def __call__(self, query: Any, retrieved: Any) -> np.ndarray:
        candidates = retrieved.rows
        item = self.items[candidates]  # (m, d)
        cross = item * query.vector  # (m, d)
        dot = cross.sum(axis=1, keepdims=True)  # (m, 1)
        pop = self.log_popularity[candidates][:, None]  # (m, 1)
        return np.concatenate([item, cross, dot, pop], axis=1)  # (m, 2d + 2)


# -- server processes ----------------------------------------------------------------------


def role_serve(bundles: Path, workers: int) -> int:
    """Serve the synthetic bundle (this script's loader kind) until SIGTERM."""
    from slimrank.serving.config import ReloadConfig, ServerConfig
    from slimrank.serving.workers import ServeSpec, serve_one, serve_workers

    server = ServerConfig(port=0, metrics_port=None, max_inflight=8, n_candidates=N_CANDIDATES)
    spec = ServeSpec(
        bundles, server, ReloadConfig(poll_interval_s=0), loaders={KIND: load_synthetic}
    )

    def ready(port: int, mport: int | None, pids: list[int]) -> None:
        print(f"serving on 127.0.0.1:{port} metrics - pids {','.join(map(str, pids))}", flush=True)

    return serve_one(spec, ready) if workers == 1 else serve_workers(spec, workers, ready)


def role_echo(response_bytes: int) -> int:
    """A bare gRPC server answering every ``/bench.Echo/Echo`` with ``response_bytes`` bytes."""
    from concurrent import futures

    import grpc

    payload = b"x" * response_bytes

    def echo(request: bytes, context: Any) -> bytes:
        return payload

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=12))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"serving on 127.0.0.1:{port} metrics - pids {os.getpid()}", flush=True)
    stop.wait()
    server.stop(1).wait()
    return 0


class ServerProcess:
    """A server subprocess; the target comes from its ready line."""

    def __init__(self, argv: list[str], timeout_s: float = 600) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = ""
        deadline = time.monotonic() + timeout_s
        while self.proc.stdout is not None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line or READY.search(line):
                break
        match = READY.search(line)
        if match is None:
            self.stop()
            raise RuntimeError(f"{argv[:4]}... did not report ready (got {line!r})")
        self.target = f"{match[1]}:{match[2]}"
        self.pids = [int(p) for p in match[4].split(",")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


# -- the load generator --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """One open-loop run at one offered rate."""

    target: str
    offered_rate: float
    sent: int
    ok: int
    errors: dict[str, int]
    achieved_rate: float  # OK answers / (last answer - first scheduled send)
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    send_lag_p99_ms: float  # how late the sender itself was against the schedule


def open_loop(
    target: str,
    method: str,
    requests: list[bytes],
    rate: float,
    duration_s: float,
    max_calls: int,
    seed: int = 0,
    timeout_s: float = 2.0,
    name: str = "",
) -> LoadResult:
    """Send ``requests`` (cycled) at Poisson times of mean ``rate``/s; measure each answer."""
    import grpc

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=max(1, min(max_calls, int(rate * duration_s))))
    schedule = np.cumsum(gaps) - gaps[0]  # (n,) seconds after start
    n = len(schedule)
    done = np.full(n, np.nan)
    sent_at = np.full(n, np.nan)
    codes: list[str | None] = [None] * n
    finished = threading.Semaphore(0)
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out
        for i in range(min(50, n)):  # connect and warm the server's threads
            call(requests[i % len(requests)], timeout=10)

        def on_done(future: grpc.Future, i: int) -> None:
            done[i] = time.perf_counter()
            error = future.exception()
            codes[i] = "OK" if error is None else error.code().name
            finished.release()

        start = time.perf_counter() + 0.05
        for i, at in enumerate(schedule):
            wait = start + at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sent_at[i] = time.perf_counter()
            future = call.future(requests[i % len(requests)], timeout=timeout_s)
            future.add_done_callback(lambda f, i=i: on_done(f, i))
        for _ in range(n):
            if not finished.acquire(timeout=timeout_s + 10):
                break
    latency = (done - (start + schedule)) * 1000  # ms from the scheduled send
    ok = np.array([c == "OK" for c in codes])
    errors: dict[str, int] = {}
    for c in codes:
        if c != "OK":
            errors[str(c)] = errors.get(str(c), 0) + 1
    ok_lat = latency[ok]
    span = np.nanmax(done[ok]) - start if ok.any() else float("nan")
    pct = np.percentile(ok_lat, [50, 95, 99]) if ok.any() else [float("nan")] * 3
    return LoadResult(
        target=name,
        offered_rate=rate,
        sent=n,
        ok=int(ok.sum()),
        errors=errors,
        achieved_rate=float(ok.sum() / span) if ok.any() else 0.0,
        p50_ms=float(pct[0]),
        p95_ms=float(pct[1]),
        p99_ms=float(pct[2]),
        max_ms=float(ok_lat.max()) if ok.any() else float("nan"),
        send_lag_p99_ms=float(np.percentile((sent_at - (start + schedule)) * 1000, 99)),
    )


def recommend_requests(n_users: int, n: int = 1000, seed: int = 1) -> list[bytes]:
    """Serialized Recommend requests for random known users, k = 10."""
    from slimrank.serving.proto.slimrank.v1 import recommender_pb2

    users = np.random.default_rng(seed).integers(0, n_users, size=n)
    return [
        recommender_pb2.RecommendRequest(user_id=f"u{u}", k=K).SerializeToString() for u in users
    ]


def response_size(target: str, request: bytes) -> int:
    """Bytes of one Recommend answer, to size the echo payload."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        return len(channel.unary_unary(RECOMMEND)(request, timeout=30))


def sweep(
    name: str,
    target: str,
    method: str,
    requests: list[bytes],
    rates: list[float],
    duration_s: float,
) -> list[LoadResult]:
    """Run ``open_loop`` at each rate, stopping once the server no longer keeps up."""
    out = []
    for rate in rates:
        result = open_loop(
            target, method, requests, rate, duration_s, int(rate * duration_s), name=name
        )
        out.append(result)
        log.info(
            "%-16s %6.0f/s: achieved %6.0f/s p50 %6.2f p99 %7.2f ms errors %s",
            name,
            rate,
            result.achieved_rate,
            result.p50_ms,
            result.p99_ms,
            result.errors or "-",
        )
        if result.ok < 0.9 * result.sent or result.p99_ms > 200:
            break
    return out


# -- in-process floors ---------------------------------------------------------------------


def percentiles_ms(fn: Callable[[int], object], n: int) -> dict[str, float]:
    """p50/p99 in ms of ``fn(i)`` over ``n`` calls (after 20 warm-up calls)."""
    for i in range(20):
        fn(i)
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times[i] = time.perf_counter() - t0
    p50, p99 = np.percentile(times * 1000, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99)}


def bare_floors(bundles: Path, n: int) -> dict[str, dict[str, float]]:
    """Time FAISS search for 200 and the features + ranker forward, in this process."""
    from slimrank.bundle import open_bundle

    snapshot = load_synthetic(open_bundle(bundles))
    rng = np.random.default_rng(2)
    users = rng.integers(0, len(snapshot.user_vectors), size=n + 20)
    vectors = snapshot.user_vectors[users]  # (n, d)
    queries = [snapshot.user_query(str(snapshot.user_ids[u]), []) for u in users[:50]]
    empty = np.empty(0, dtype=np.int64)
    cands = [snapshot.retrieve(q, N_CANDIDATES, empty) for q in queries]
    feats = [snapshot.featurize(queries[i], cands[i]) for i in range(50)]
    return {
        "faiss_search": percentiles_ms(
            lambda i: snapshot.search(vectors[i : i + 1], N_CANDIDATES), n
        ),
        "features": percentiles_ms(lambda i: snapshot.featurize(queries[i % 50], cands[i % 50]), n),
        "ranker_forward": percentiles_ms(lambda i: snapshot.score(feats[i % 50]), n),
    }


# -- report ----------------------------------------------------------------------------------


def goals(runs: dict[str, list[LoadResult]], floor_ms: float) -> dict[str, Any]:
    """Where the three goals land for the synthetic target(s)."""
    out: dict[str, Any] = {}
    for name, results in runs.items():
        if not name.startswith("synthetic"):
            continue
        at200 = next((r for r in results if r.offered_rate == 200), None)
        held = [r.offered_rate for r in results if r.p99_ms <= 20 and not r.errors]
        low = results[0] if results else None
        out[name] = {
            "p99_ms_at_200": None if at200 is None else round(at200.p99_ms, 2),
            "p99_le_10ms_at_200": None if at200 is None else at200.p99_ms <= 10,
            "p50_ms_lowest_rate": None if low is None else round(low.p50_ms, 2),
            "floor_ms": round(floor_ms, 2),
            "p50_over_floor": None if low is None else round(low.p50_ms / floor_ms, 2),
            "highest_rate_p99_le_20ms": max(held) if held else None,
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Serving latency (open loop)",
        "",
        f"{report['date']} · {report['machine']} · load average before/after "
        f"{report['loadavg_before']} / {report['loadavg_after']} · items {report['n_items']:,}",
        "",
        "| target | offered/s | achieved/s | p50 ms | p95 ms | p99 ms | max ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for results in report["runs"].values():
        for r in results:
            errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
            lines.append(
                f"| {r['target']} | {r['offered_rate']:.0f} | {r['achieved_rate']:.0f} | "
                f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r['max_ms']:.2f} | {errors} |"
            )
    lines += ["", "In-process floors (one query, 200 candidates):", ""]
    lines += ["| stage | p50 ms | p99 ms |", "|---|---:|---:|"]
    for stage, p in report["floors"].items():
        lines.append(f"| {stage} | {p['p50_ms']:.3f} | {p['p99_ms']:.3f} |")
    lines += ["", "Goals:", "", "```", json.dumps(report["goals"], indent=2), "```"]
    for note in report["notes"]:
        lines += ["", f"- {note}"]
    return "\n".join(lines) + "\n"


def print_table(report: dict[str, Any]) -> None:
    print(markdown(report))


def run(args: argparse.Namespace) -> int:
    n_items = args.items or (100_000 if args.quick else 1_000_000)
    duration = args.duration or (3.0 if args.quick else 10.0)
    rates = [float(r) for r in args.rates.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    bundles = CACHE / f"bundles-{n_items}"
    build_synthetic_bundle(bundles, n_items)
    runs: dict[str, list[LoadResult]] = {}
    notes: list[str] = []
    requests = recommend_requests(N_USERS)
    me = [sys.executable, str(Path(__file__).resolve())]
    size = 0
    for n in workers:
        server = ServerProcess([*me, "--role", "serve", "--bundles", str(bundles), "--n", str(n)])
        try:
            size = response_size(server.target, requests[0])
            name = f"synthetic w{n}"
            runs[name] = sweep(name, server.target, RECOMMEND, requests, rates, duration)
        finally:
            server.stop()
    echo = ServerProcess([*me, "--role", "echo", "--n", str(size)])
    try:
        echo_requests = [r.ljust(len(requests[0]), b" ") for r in requests[:1]]
        runs["grpc echo"] = sweep("grpc echo", echo.target, ECHO, echo_requests, rates, duration)
    finally:
        echo.stop()
    demo = demo_target()
    if isinstance(demo, str):
        notes.append(demo)
        log.info("%s", demo)
    else:
        try:
            ml = demo_requests(demo)
            runs["ml100k"] = sweep("ml100k", demo.target, RECOMMEND, ml, rates, duration)
        finally:
            demo.stop()
    floors = bare_floors(bundles, 300 if args.quick else 1000)
    floor_ms = runs["grpc echo"][0].p50_ms + sum(
        floors[s]["p50_ms"] for s in ("faiss_search", "features", "ranker_forward")
    )
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}",
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "n_items": n_items,
        "duration_s_per_rate": duration,
        "rates": rates,
        "response_bytes": size,
        "runs": {k: [dataclasses.asdict(r) for r in v] for k, v in runs.items()},
        "floors": floors,
        "goals": goals(runs, floor_ms),
        "notes": [
            *notes,
            "floor = echo p50 at the lowest rate + bare FAISS search + features + ranker p50",
            "latency is from the scheduled send time; client and server share the machine",
        ],
        "command": " ".join(sys.argv),
    }
    print_table(report)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "serving.md").write_text(markdown(report))
        log.info("wrote %s and %s", RESULTS / "serving.json", RESULTS / "serving.md")
    return 0


def demo_target() -> ServerProcess | str:
    """Start ``slimrank serve`` on the ml-100k demo bundles, or say why not."""
    from slimrank.bundle import open_bundle
    from slimrank.serving.loader import default_loaders, serving_spec

    if not (DEMO_BUNDLES / "CURRENT").is_file():
        return f"ml100k skipped: no {DEMO_BUNDLES.relative_to(ROOT)}/CURRENT (run make demo)"
    try:
        kind = serving_spec(open_bundle(DEMO_BUNDLES))["kind"]
    except Exception as err:  # any reason the demo bundle cannot be read is a skip
        return f"ml100k skipped: {type(err).__name__}: {err}"
    if kind not in default_loaders():
        return f"ml100k skipped: bundle kind {kind!r} has no serving loader yet"
    argv = [sys.executable, "-m", "slimrank.cli", "serve", "--bundles", str(DEMO_BUNDLES)]
    return ServerProcess([*argv, "--port", "0", "--metrics-port", "-1", "--poll-interval", "0"])


def demo_requests(server: ServerProcess) -> list[bytes]:
    """Recommend requests for the demo bundle's own users."""
    from slimrank.bundle import open_bundle
    from slimrank.serving.loader import load_snapshot
    from slimrank.serving.proto.slimrank.v1 import recommender_pb2

    users = load_snapshot(open_bundle(DEMO_BUNDLES)).user_ids
    pick = np.random.default_rng(1).integers(0, len(users), size=1000)
    return [
        recommender_pb2.RecommendRequest(user_id=str(users[u]), k=K).SerializeToString()
        for u in pick
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k items, 3 s per rate")
    parser.add_argument("--items", type=int, default=0, help="catalog size (default 1M)")
    parser.add_argument("--rates", default="50,100,200,400,800", help="offered calls/s")
    parser.add_argument("--duration", type=float, default=0, help="seconds per rate")
    parser.add_argument("--workers", default="1,2", help="server processes to compare")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--role", choices=("bench", "serve", "echo"), default="bench")
    parser.add_argument("--bundles", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.role == "serve":
        return role_serve(args.bundles, args.n)
    if args.role == "echo":
        return role_echo(args.n)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
