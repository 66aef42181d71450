"""Serving latency under open-loop load, against the real server in a subprocess.

Send times are scheduled in advance (Poisson arrivals at a fixed rate) and kept whatever the
responses do, so a slow server shows up as latency rather than as a lower request rate
(latency is measured from the scheduled send time). Each run is bounded in calls and time,
on loopback only. Targets:

* ``scale``: the bundle the pipeline publishes from ``configs/scale.toml`` on a synthetic world
  (``slimrank data generate world``; 1M users x 1M items x 20 interactions per user by
  default, ``--scale-size`` or ``$SLIMRANK_SCALE_SIZE`` for a smaller one), built once by
  ``bench/scale_steps.py``'s run and cached under ``bench/.cache/scale``: the tuned IVF-PQ
  index, the real feature set and the gated int8 ranker, loaded by the normal loader and served
  by ``serve_one`` / ``serve_workers`` (``--workers``) as ``slimrank serve`` serves it.
  Its floor: a bare gRPC echo server under the same load, and in this process the bundle's
  FAISS search and its features + ranker forward.
* ``ml100k``: server modes (``MODES``: the sync server, grpc.aio with handlers inline or on
  1-2 threads, 2 processes, GIL switch intervals) on ``runs/demo/bundles`` (``--demo-bundles``)
  as is and with a synthetic ~0.25 ms featurizer, each against the echo through the same
  server and client, and past capacity (twice the highest rate held); the load generator is
  ``bench/loadgen.py`` in its own process. Writes ``bench/results/serving_modes.{json,md}``.

    .venv/bin/python bench/serving.py --targets scale   # the 1M bundle, 10 s per rate
    SLIMRANK_SCALE_SIZE=2000x1000x15 .venv/bin/python bench/serving.py --targets scale --quick
    .venv/bin/python bench/serving.py --targets ml100k --loadgen-ceiling   # all modes (~1 h)

The scale target writes ``bench/results/serving.{json,md}`` (``--no-save``: print only). The
machine's load average is recorded beside the numbers: on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # loadgen.py, also when this module is imported as bench.serving
from loadgen import drive, job_for  # noqa: E402

from slimrank.compression.cpu import cpu_times, steal_share  # noqa: E402
from slimrank.serving.core_queue import DEFAULT_REFRESH_S  # noqa: E402

CACHE = HERE / ".cache" / "serving"
RESULTS = HERE / "results"
DEMO_BUNDLES = ROOT / "runs" / "demo" / "bundles"
SCALE_SIZE_ENV = "SLIMRANK_SCALE_SIZE"
SCALE_OVERRIDE_ENV = "SLIMRANK_SCALE_OVERRIDE"
N_CANDIDATES = 200
K = 10
READY = re.compile(r"serving on (\S+):(\d+) metrics (\S+) pids ([\d,]+)")
RECOMMEND = "/slimrank.v1.Recommender/Recommend"
ECHO = "/bench.Echo/Echo"

log = logging.getLogger("bench.serving")


# -- the scale bundle ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScaleSize:
    """The synthetic world the scale target's bundle is trained on."""

    users: int
    items: int
    per_user: float

    @classmethod
    def parse(cls, text: str) -> ScaleSize:
        """``USERSxITEMSxPER_USER``, e.g. ``1000000x1000000x20``."""
        try:
            users, items, per_user = text.lower().split("x")
            return cls(int(users), int(items), float(per_user))
        except ValueError:
            raise SystemExit(
                f"--scale-size / {SCALE_SIZE_ENV}={text!r}: expected USERSxITEMSxPER_USER, "
                "e.g. 1000000x1000000x20"
            ) from None


def scale_bundle(size: ScaleSize, override: str) -> Path:
    """Return the bundles root of ``configs/scale.toml``'s pipeline run on a world of ``size``.

    Built once by ``bench/scale_steps.py``'s run (world, step cache and bundles under
    ``bench/.cache/scale``; its table is not written from here) and reused while it holds a
    published version: ``make bench-scale`` and this bench share it.
    """
    import scale_steps

    from slimrank.bundle import current_version

    args = argparse.Namespace(
        users=size.users,
        items=size.items,
        per_user=size.per_user,
        seed=0,
        name="",
        config=str(ROOT / "configs" / "scale.toml"),
        until="",
        override=override,
    )
    bundles = scale_steps.CACHE / f"bundles-{scale_steps.run_name(args)}"
    if current_version(bundles) is None:
        log.info("no published scale bundle in %s: running the pipeline", bundles)
        result = scale_steps.run(args)
        if current_version(bundles) is None:
            raise SystemExit(
                f"the scale pipeline published nothing: "
                f"{result.get('failed') or result.get('gate')}"
            )
    return bundles


# -- server processes ----------------------------------------------------------------------


def role_serve(bundles: Path, workers: int) -> int:
    """Serve the bundles under ``bundles`` with the normal loaders until SIGTERM, configured
    as ``slimrank serve`` is by default (handlers on the loop, its wait bounds)."""
    from slimrank.serving import cli
    from slimrank.serving.config import ReloadConfig, ServerConfig
    from slimrank.serving.workers import ServeSpec, serve_one, serve_workers

    server = ServerConfig(
        port=0,
        metrics_port=None,
        max_inflight=8,
        n_candidates=N_CANDIDATES,
        handler_threads=cli.DEFAULT_HANDLER_THREADS,
        max_wait_s=cli.DEFAULT_MAX_WAIT_MS / 1000,
        burst_wait_s=cli.DEFAULT_BURST_WAIT_MS / 1000,
    )
    spec = ServeSpec(bundles, server, ReloadConfig(poll_interval_s=0))

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

    def __init__(
        self,
        argv: list[str],
        timeout_s: float = 600,
        env: dict[str, str] | None = None,
        code: Path = ROOT,
    ) -> None:
        """Run ``argv`` (``python -m slimrank.cli serve ...``) in ``code``, a checkout: ``-m``
        puts the working directory first on ``sys.path``, so that checkout's ``slimrank`` is
        served (``PYTHONPATH`` alone would lose to it)."""
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, text=True, cwd=code, env={**os.environ, **(env or {})}
        )
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
        self.ready_line = line
        self.target = f"{match[1]}:{match[2]}"
        self.metrics = match[3]  # host:port of /metrics, or what the server prints without it
        self.pids = [int(p) for p in match[4].split(",")]

    def counters(self, *names: str) -> dict[str, float]:
        """Read counters (``slimrank_stalls_total`` ...) from the server's /metrics, summed
        over their labels; NaN when the server has no metrics port."""
        samples = self._samples()
        if samples is None:
            return {name: float("nan") for name in names}
        return {name: sum(s.value for s in samples if s.name == name) for name in names}

    def counter_by(self, name: str, label: str) -> dict[str, float]:
        """Counter ``name`` summed per value of ``label`` (``{}`` without a metrics port)."""
        by: dict[str, float] = {}
        for s in self._samples() or []:
            if s.name == name:
                value = s.labels.get(label, "")
                by[value] = by.get(value, 0.0) + s.value
        return by

    def _samples(self) -> list[Any] | None:
        return metric_samples(self.metrics)

    def stop(self) -> int:
        return stop_process(self.proc)


def metric_samples(address: str) -> list[Any] | None:
    """Every sample on ``http://ADDRESS/metrics``; None when it cannot be read."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def stop_process(proc: subprocess.Popen[str]) -> int:
    """SIGTERM ``proc`` (a server or a front), SIGKILL it after 60 s; return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


def checkout(path: str) -> Path:
    """``path`` as the absolute path of a slimrank checkout (an argparse ``type``)."""
    tree = Path(path).resolve()
    if not (tree / "slimrank" / "cli.py").is_file():
        raise argparse.ArgumentTypeError(
            f"{path!r} is not a slimrank checkout (no slimrank/cli.py)"
        )
    return tree


def imported_tree(code: Path) -> Path:
    """The checkout whose ``slimrank`` a ``python -m slimrank.cli`` started in ``code``
    imports (checked by starting one: an A/B that served one tree twice measured nothing)."""
    out = subprocess.run(
        [sys.executable, "-c", "import slimrank; print(slimrank.__file__)"],
        cwd=code,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip()).resolve().parent.parent


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


def bare_floors(snapshot: Any, n: int) -> dict[str, dict[str, float]]:
    """Time FAISS search for 200 and the features + ranker forward, in this process."""
    rng = np.random.default_rng(2)
    users = rng.integers(0, len(snapshot.user_vectors), size=n + 20)
    vectors = snapshot.user_vectors[users]  # (n, d)
    queries = [snapshot.user_query(str(snapshot.user_ids[u]), []) for u in users[:50]]
    empty = np.empty(0, dtype=np.int64)
    m = snapshot.n_candidates or N_CANDIDATES  # what the server retrieves for this bundle
    cands = [snapshot.retrieve(q, m, empty) for q in queries]
    feats = [snapshot.featurize(queries[i], cands[i]) for i in range(50)]
    return {
        "faiss_search": percentiles_ms(lambda i: snapshot.search(vectors[i : i + 1], m), n),
        "features": percentiles_ms(lambda i: snapshot.featurize(queries[i % 50], cands[i % 50]), n),
        "ranker_forward": percentiles_ms(lambda i: snapshot.score(feats[i % 50]), n),
    }


# -- report ----------------------------------------------------------------------------------


def goals(runs: dict[str, list[LoadResult]], floor_ms: float) -> dict[str, Any]:
    """Where the three goals land for the scale target(s)."""
    out: dict[str, Any] = {}
    for name, results in runs.items():
        if not name.startswith("scale"):
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
    lines += ["", f"In-process floors (one query, {report['n_candidates']} candidates):", ""]
    lines += ["| stage | p50 ms | p99 ms |", "|---|---:|---:|"]
    for stage, p in report["floors"].items():
        lines.append(f"| {stage} | {p['p50_ms']:.3f} | {p['p99_ms']:.3f} |")
    lines += ["", "Goals:", "", "```", json.dumps(report["goals"], indent=2), "```"]
    for note in report["notes"]:
        lines += ["", f"- {note}"]
    return "\n".join(lines) + "\n"


def print_table(report: dict[str, Any]) -> None:
    print(markdown(report))


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it, else as given."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def run_scale(args: argparse.Namespace) -> int:
    from slimrank.bundle import open_bundle
    from slimrank.serving.loader import load_snapshot

    size = ScaleSize.parse(args.scale_size)
    duration = args.duration or (3.0 if args.quick else 10.0)
    rates = [float(r) for r in args.rates.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    bundles = args.scale_bundles or scale_bundle(size, args.scale_override)
    snapshot = load_snapshot(open_bundle(bundles))  # the normal loader, as the server's
    n_items = snapshot.n_items
    runs: dict[str, list[LoadResult]] = {}
    notes: list[str] = [
        f"bundle {snapshot.version} from {_shown(bundles)}: configs/scale.toml on a "
        f"world of {size.users:,} users x {size.items:,} items x {size.per_user:g} per user"
        + (f", overrides {args.scale_override}" if args.scale_override else "")
    ]
    requests = recommend_requests(snapshot.user_ids)
    me = [sys.executable, str(Path(__file__).resolve())]
    response_bytes = 0
    for n in workers:
        server = ServerProcess([*me, "--role", "serve", "--bundles", str(bundles), "--n", str(n)])
        try:
            response_bytes = response_size(server.target, requests[0])
            name = f"scale w{n}"
            runs[name] = sweep(name, server.target, RECOMMEND, requests, rates, duration)
        finally:
            server.stop()
    echo = ServerProcess([*me, "--role", "echo", "--n", str(response_bytes)])
    try:
        echo_requests = [r.ljust(len(requests[0]), b" ") for r in requests[:1]]
        runs["grpc echo"] = sweep("grpc echo", echo.target, ECHO, echo_requests, rates, duration)
    finally:
        echo.stop()
    floors = bare_floors(snapshot, 300 if args.quick else 1000)
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
        "n_candidates": snapshot.n_candidates or N_CANDIDATES,
        "duration_s_per_rate": duration,
        "rates": rates,
        "response_bytes": response_bytes,
        "runs": {k: [dataclasses.asdict(r) for r in v] for k, v in runs.items()},
        "floors": floors,
        "goals": goals(runs, floor_ms),
        "notes": [
            *notes,
            "floor = echo p50 at the lowest rate + bare FAISS search + features + ranker p50",
            "latency is from the scheduled send time; client and server share the machine",
        ],
        "command": shlex.join(sys.argv),
    }
    print_table(report)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "serving.md").write_text(markdown(report))
        log.info("wrote %s and %s", RESULTS / "serving.json", RESULTS / "serving.md")
    return 0


# -- ml-100k: server modes -----------------------------------------------------------------
#
# Each mode is a server configuration; each is measured on the real ml-100k bundle, on the same
# bundle with a synthetic cheap featurizer ("fastfeat": what the coming featurizer costs), and
# on the echo (the same server, engine, interceptors and client; a canned answer instead of
# the model work). The load generator is bench/loadgen.py in its own process.

HOLD_P99_MS = 20.0
HOLD_MAX_BAD = 0.001  # at most this fraction of calls refused or failed at a held rate
FAST_REPS = 6  # rounds of the fastfeat variant's featurizer: ~0.25 ms, what the new one costs


@dataclasses.dataclass(frozen=True)
class Mode:
    """One server configuration under test."""

    name: str
    engine: str = "aio"
    handler_threads: int = 1
    workers: int = 1
    max_inflight: int = 16
    max_wait_s: float | None = 0.005  # slimrank serve's default (--max-wait-ms 5)
    burst_wait_s: float | None = 0.030  # slimrank serve's default (--burst-wait-ms 30)
    burst_recovery_s: float = 0.25  # slimrank serve's default (--burst-recovery-ms 250)
    switch_interval_s: float | None = None
    max_workers: int = 20
    max_pending_rpcs: int = 64
    core_queue_refresh_s: float | None = DEFAULT_REFRESH_S  # serve's default; None: off
    about: str = ""

    def server(self) -> dict[str, Any]:
        """ServerConfig overrides."""
        return {
            "engine": self.engine,
            "handler_threads": self.handler_threads,
            "max_inflight": self.max_inflight,
            "max_wait_s": self.max_wait_s,
            "burst_wait_s": self.burst_wait_s,
            "burst_recovery_s": self.burst_recovery_s,
            "switch_interval_s": self.switch_interval_s,
            "max_workers": self.max_workers,
            "max_pending_rpcs": self.max_pending_rpcs,
            "core_queue_refresh_s": self.core_queue_refresh_s,
        }


TODAY = {
    "engine": "sync",
    "max_inflight": 8,
    "max_wait_s": None,
    "burst_wait_s": None,
    "max_workers": 12,
}
MODES = {
    m.name: m
    for m in (
        Mode("sync", **TODAY, about="today: grpc.server, 12 threads, 8 in flight, 64 pending"),
        Mode("sync-w2", **TODAY, workers=2, about="today's server in 2 processes"),
        Mode("aio-inline", handler_threads=0, about="grpc.aio, handlers on the event loop"),
        Mode("aio-inline-w2", handler_threads=0, workers=2, about="aio-inline in 2 processes"),
        Mode(
            "aio-inline-w2-uncounted",
            handler_threads=0,
            workers=2,
            core_queue_refresh_s=None,
            about="aio-inline-w2 without counting the calls queued in gRPC's core",
        ),
        Mode(
            "aio-inline-wait2ms",
            handler_threads=0,
            max_wait_s=0.002,
            about="aio-inline, a standing queue cut to 2 ms instead of 5",
        ),
        Mode(
            "aio-inline-w2-wait2ms",
            handler_threads=0,
            workers=2,
            max_wait_s=0.002,
            about="aio-inline-w2, a standing queue cut to 2 ms instead of 5",
        ),
        Mode(
            "aio-inline-norecovery",
            handler_threads=0,
            burst_recovery_s=0.0,
            about="aio-inline, a fresh burst allowance each time the queue empties",
        ),
        Mode(
            "aio-inline-recovery1s",
            handler_threads=0,
            burst_recovery_s=1.0,
            about="aio-inline, overload remembered for 1 s instead of 0.25 s",
        ),
        Mode(
            "aio-inline-w2-norecovery",
            handler_threads=0,
            workers=2,
            burst_recovery_s=0.0,
            about="aio-inline-w2, a fresh burst allowance each time the queue empties",
        ),
        Mode(
            "aio-inline-w2-noburst",
            handler_threads=0,
            workers=2,
            burst_wait_s=None,
            about="aio-inline-w2 holding every call to max_wait, bursts too",
        ),
        Mode(
            "aio-t1-w2-uncounted",
            workers=2,
            core_queue_refresh_s=None,
            about="aio-t1-w2 without counting the calls queued in gRPC's core",
        ),
        Mode("aio-t1", about="grpc.aio, handlers on 1 thread"),
        Mode(
            "aio-t1-w2-si0.5ms",
            workers=2,
            switch_interval_s=0.0005,
            about="aio-t1 in 2 processes, GIL switch interval 0.5 ms",
        ),
        Mode("aio-t2", handler_threads=2, about="grpc.aio, handlers on 2 threads"),
        Mode("aio-t1-si1ms", switch_interval_s=0.001, about="aio-t1, GIL switch interval 1 ms"),
        Mode("aio-t1-si0.5ms", switch_interval_s=0.0005, about="aio-t1, GIL switch 0.5 ms"),
        Mode("aio-t1-w2", workers=2, about="aio-t1 in 2 processes"),
        Mode(
            "aio-t1-w2-si1ms",
            workers=2,
            switch_interval_s=0.001,
            about="aio-t1 in 2 processes, GIL switch interval 1 ms",
        ),
    )
}
DEFAULT_MODES = ",".join(MODES)


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio}x"


def _core_queue(mode: dict[str, Any]) -> str:
    """How a results row's mode counted gRPC's core queue (rows older than the count: not)."""
    refresh = mode.get("core_queue_refresh_s")
    return "not counted" if refresh is None else f"read at most every {refresh * 1000:g} ms"


def cpu_features() -> dict[str, Any]:
    """The CPU's model name and the SIMD flags that matter to FAISS and onnxruntime."""
    from slimrank.compression.cpu import cpu_features as read_cpu

    return read_cpu()


def load_fastfeat(bundle: Any) -> Any:
    """The bundle's snapshot with a synthetic featurizer of ~0.25 ms per call.

    FAISS retrieval and the int8 ONNX ranker are the bundle's own; the features are numpy work
    of what the coming featurizer costs, in the ranker's input width (their values are
    meaningless, so the answers are too). Written against the snapshot's featurizer only
    through its candidate rows, so it survives changes to the featurizer's signature.
    """
    from slimrank.serving.loader import default_loaders, serving_spec

    snapshot = default_loaders()[str(serving_spec(bundle)["kind"])](bundle)
    fast = FastFeatures(snapshot.n_items, ranker_width(snapshot))
    names = {f.name for f in dataclasses.fields(snapshot)}
    swap = {name: fast for name in ("featurize", "featurize_history") if name in names}
    return dataclasses.replace(snapshot, **swap)


def ranker_width(snapshot: Any) -> int:
    """Features per candidate the snapshot's ranker takes (the ONNX scorer's input width)."""
    scorer = getattr(snapshot.score, "__self__", None)
    width = getattr(scorer, "input_dim", None)
    if not isinstance(width, int):
        raise TypeError("the snapshot's score is not a Scorer method: cannot tell its width")
    return width


def candidate_rows(args: tuple[Any, ...]) -> np.ndarray:
    """The candidate item rows among a featurizer's arguments (an int array, or ``.rows``)."""
    for arg in reversed(args):
        rows = getattr(arg, "rows", arg)
        if isinstance(rows, np.ndarray) and rows.ndim == 1 and rows.dtype.kind in "iu":
            return rows
    raise TypeError("no candidate rows among the featurizer's arguments")


class FastFeatures:
    """``(m, F)`` float32 features from a random item table, with ``reps`` elementwise rounds.

    Elementwise numpy only (no BLAS, so no threads of its own): ``FAST_REPS`` rounds on
    200 x ~260 features cost about what the coming featurizer does (~0.25 ms).
    """

    def __init__(self, n_items: int, n_features: int, reps: int = 0) -> None:
        rng = np.random.default_rng(0)
        self.table = rng.standard_normal((n_items, n_features)).astype(np.float32)
        self.reps = reps or FAST_REPS

    def __call__(self, *args: Any) -> np.ndarray:
        x = self.table[candidate_rows(args) % len(self.table)]  # (m, F)
        for _ in range(self.reps):
            x = np.tanh(x) * 0.5 + x * 0.25  # (m, F)
        return x


class EchoRecommender:
    """A Recommender servicer answering every Recommend with one canned, real-sized answer.

    The answer is the real servicer's for the bundle's first user, computed once.
    """

    def __init__(self, holder: Any, config: Any, metrics: Any) -> None:
        from slimrank.serving.proto.slimrank.v1 import recommender_pb2
        from slimrank.serving.servicer import RecommenderServicer

        self._real = RecommenderServicer(holder, config, metrics)
        request = recommender_pb2.RecommendRequest(user_id=str(holder.get().user_ids[0]), k=K)
        self._answer = self._real.Recommend(request, _LocalContext())

    def Recommend(self, request: Any, context: Any) -> Any:
        return self._answer

    def Search(self, request: Any, context: Any) -> Any:
        return self._real.Search(request, context)

    def RecommendBatch(self, request: Any, context: Any) -> Any:
        return self._real.RecommendBatch(request, context)


class _LocalContext:
    """The servicer context of a call made in-process (no deadline; abort raises)."""

    def time_remaining(self) -> None:
        return None

    def code(self) -> None:
        return None

    def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def role_mode_serve(spec_json: str) -> int:
    """Serve the ml-100k bundle in one mode (variant ml100k, fastfeat or echo) until SIGTERM."""
    from slimrank.serving.config import ReloadConfig, ServerConfig
    from slimrank.serving.workers import ServeSpec, serve_one, serve_workers

    spec = json.loads(spec_json)
    variant, workers = spec["variant"], int(spec["workers"])
    server = ServerConfig(port=0, metrics_port=None, **spec["server"])
    serve_spec = ServeSpec(
        Path(spec["bundles"]),
        server,
        ReloadConfig(poll_interval_s=0),
        loaders={"pipeline": load_fastfeat} if variant == "fastfeat" else {},
        recommender=EchoRecommender if variant == "echo" else None,
    )

    def ready(port: int, mport: int | None, pids: list[int]) -> None:
        print(f"serving on 127.0.0.1:{port} metrics - pids {','.join(map(str, pids))}", flush=True)

    if workers == 1:
        return serve_one(serve_spec, ready)
    return serve_workers(serve_spec, workers, ready)


@dataclasses.dataclass(frozen=True)
class Run:
    """One open-loop run of one mode and variant at one offered rate."""

    mode: str
    variant: str
    offered_rate: float
    duration_s: float
    sent: int
    ok: int
    refused: int  # RESOURCE_EXHAUSTED
    failed: dict[str, int]  # every other non-OK code
    goodput: float  # OK answers per second: OK calls x offered rate / calls sent
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    refusal_p50_ms: float
    refusal_p99_ms: float
    send_lag_p50_ms: float
    send_lag_p99_ms: float
    loadgen_cpu_ms_per_call: float
    server_cpu_cores: float  # server CPU seconds per second of the run, all its processes
    server_rss_mib: float  # the largest VmRSS of the server's processes after the run
    loadavg_before: list[float]
    loadavg_after: list[float]
    steal_pct: float | None  # share of the machine's CPU time stolen by the hypervisor
    channels: int
    held: bool


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


def status_kib(pid: int, field: str) -> float:
    """A ``kB`` field of ``/proc/<pid>/status`` (e.g. VmRSS, VmHWM); NaN if unreadable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def _rss_mib(pids: list[int]) -> float:
    """The largest resident set (VmRSS) of ``pids``, in MiB (NaN when none is readable)."""
    sizes = [status_kib(pid, "VmRSS") / 1024 for pid in pids]
    sizes = [size for size in sizes if not np.isnan(size)]
    return round(max(sizes), 1) if sizes else float("nan")


def _cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


def load_run(
    server: ServerProcess,
    mode: Mode,
    variant: str,
    requests: list[bytes],
    rate: float,
    duration_s: float,
    args: argparse.Namespace,
    balance_dir: Path | None,
    seed: int = 0,
) -> Run:
    """Run bench/loadgen.py once against ``server``; summarize what it saw."""

    n = max(1, int(max(duration_s * rate, min(args.min_calls, 60 * rate))))
    job = job_for(
        server.target,
        RECOMMEND,
        requests,
        rate,
        n,
        seed=seed,
        client=args.client,
        channels=args.channels,
        workers=mode.workers,
        balance_dir=balance_dir,
    )
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    cpu0, t0, times0 = _cpu_seconds(server.pids), time.perf_counter(), cpu_times()
    out = drive(job, n / rate + 120)
    cpu1, t1 = _cpu_seconds(server.pids), time.perf_counter()
    stolen = steal_share(times0, cpu_times())
    schedule, sent, done, codes = out["schedule"], out["sent"], out["done"], out["codes"]
    meta = out["meta"]
    latency = (done - schedule) * 1000  # (n,) ms from the scheduled send
    ok = codes == 0
    refused = codes == grpc_code("RESOURCE_EXHAUSTED")
    failed: dict[str, int] = {}
    for code in np.unique(codes[~ok & ~refused]):
        failed[grpc_name(int(code))] = int((codes == code).sum())
    span = float(schedule[-1]) if n > 1 else duration_s
    ok_lat = latency[ok]
    p99 = _pct(ok_lat, 99)
    bad = int(n - ok.sum())
    return Run(
        mode=mode.name,
        variant=variant,
        offered_rate=rate,
        duration_s=round(span, 2),
        sent=n,
        ok=int(ok.sum()),
        refused=int(refused.sum()),
        failed=failed,
        goodput=round(float(ok.sum()) * rate / n, 1),  # OK answers per second offered
        p50_ms=_pct(ok_lat, 50),
        p95_ms=_pct(ok_lat, 95),
        p99_ms=p99,
        max_ms=float(ok_lat.max()) if ok_lat.size else float("nan"),
        refusal_p50_ms=_pct(latency[refused], 50),
        refusal_p99_ms=_pct(latency[refused], 99),
        send_lag_p50_ms=_pct((sent - schedule) * 1000, 50),
        send_lag_p99_ms=_pct((sent - schedule) * 1000, 99),
        loadgen_cpu_ms_per_call=round(meta["cpu_s"] * 1000 / n, 4),
        server_cpu_cores=round((cpu1 - cpu0) / (t1 - t0), 3),
        server_rss_mib=_rss_mib(server.pids),
        loadavg_before=loadavg_before,
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
        steal_pct=None if stolen is None else round(100 * stolen, 1),
        channels=int(meta["channels"]),
        held=bool(p99 <= HOLD_P99_MS and bad <= HOLD_MAX_BAD * n),
    )


def grpc_code(name: str) -> int:
    import grpc

    return int(grpc.StatusCode[name].value[0])


def grpc_name(number: int) -> str:
    import grpc

    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.name
    return f"code {number}"


def start_mode(mode: Mode, variant: str, bundles: Path) -> tuple[ServerProcess, Path | None]:
    """Start a server process for ``mode`` (its multiprocess metrics dir with workers > 1)."""
    import tempfile

    spec = {
        "variant": variant,
        "workers": mode.workers,
        "bundles": str(bundles),
        "server": mode.server(),
    }
    env: dict[str, str] = {}
    balance_dir = None
    if mode.workers > 1:
        balance_dir = Path(tempfile.mkdtemp(prefix="slimrank-bench-metrics-"))
        env["PROMETHEUS_MULTIPROC_DIR"] = str(balance_dir)
    me = [sys.executable, str(Path(__file__).resolve())]
    server = ServerProcess([*me, "--role", "mode-serve", "--spec", json.dumps(spec)], env=env)
    return server, balance_dir


def log_run(r: Run) -> None:
    log.info(
        "%-14s %-8s %5.0f/s: goodput %6.1f p50 %6.2f p99 %7.2f ms refused %d (p99 %.2f ms) "
        "failed %s lag p99 %.2f ms server %.2f cores load %s steal %s%%",
        r.mode,
        r.variant,
        r.offered_rate,
        r.goodput,
        r.p50_ms,
        r.p99_ms,
        r.refused,
        r.refusal_p99_ms,
        r.failed or "-",
        r.send_lag_p99_ms,
        r.server_cpu_cores,
        r.loadavg_after,
        r.steal_pct,
    )


def sweep_mode(
    mode: Mode,
    variant: str,
    bundles: Path,
    requests: list[bytes],
    rates: list[float],
    args: argparse.Namespace,
    overload: bool,
) -> list[Run]:
    """Rates in order until saturation (or two not held in a row); then, with ``overload``,
    twice the highest rate held."""
    server, balance_dir = start_mode(mode, variant, bundles)
    runs: list[Run] = []
    try:
        for rate in rates:
            run = load_run(server, mode, variant, requests, rate, args.duration, args, balance_dir)
            log_run(run)
            runs.append(run)
            # One p99 spike on a shared machine does not end the sweep; saturation, or two
            # rates in a row not held, does.
            saturated = run.goodput < 0.9 * rate or run.sent - run.ok > 0.05 * run.sent
            if saturated or (len(runs) > 1 and not run.held and not runs[-2].held):
                break
        held = [r.offered_rate for r in runs if r.held]
        if overload and held:
            run = load_run(
                server, mode, variant, requests, 2 * max(held), args.duration, args, balance_dir
            )
            runs.append(dataclasses.replace(run, variant=f"{variant} overload"))
            log_run(runs[-1])
    finally:
        server.stop()
    return runs


def in_process_floors(bundles: Path, n: int) -> dict[str, dict[str, float]]:
    """Per-call costs on one core, in this process: the whole Recommend and its stages.

    Stages are the means of the servicer's own stage histograms (retrieve, features, rank),
    so this reads the request path only through the servicer and its metrics.
    """
    from slimrank.bundle import open_bundle
    from slimrank.serving.loader import load_snapshot

    bundle = open_bundle(bundles)
    out = stage_costs(load_snapshot(bundle), "ml100k", n)
    out.update(stage_costs(load_fastfeat(bundle), "fastfeat", n))
    return out


def stage_costs(snapshot: Any, variant: str, n: int) -> dict[str, dict[str, float]]:
    """p50/p99 ms of an in-process Recommend, and the mean ms of each stage it timed."""
    from prometheus_client import CollectorRegistry

    from slimrank.serving.config import ServerConfig
    from slimrank.serving.metrics import ServingMetrics
    from slimrank.serving.proto.slimrank.v1 import recommender_pb2
    from slimrank.serving.servicer import RecommenderServicer
    from slimrank.serving.snapshot import SnapshotHolder

    registry = CollectorRegistry()
    servicer = RecommenderServicer(
        SnapshotHolder(snapshot), ServerConfig(), ServingMetrics(registry)
    )
    users = np.random.default_rng(3).integers(0, len(snapshot.user_ids), size=64)
    reqs = [recommender_pb2.RecommendRequest(user_id=str(snapshot.user_ids[u]), k=K) for u in users]
    out = {
        f"Recommend in-process ({variant})": percentiles_ms(
            lambda i: servicer.Recommend(reqs[i % 64], _LocalContext()), n
        )
    }
    for stage in ("retrieve", "features", "rank"):
        labels = {"stage": stage}
        total = registry.get_sample_value("slimrank_stage_duration_seconds_sum", labels) or 0.0
        count = registry.get_sample_value("slimrank_stage_duration_seconds_count", labels) or 0.0
        if count:
            out[f"{stage} mean ({variant})"] = {"mean_ms": 1000 * total / count}
    return out


def batching_floor(bundles: Path, n: int) -> dict[str, float]:
    """What coalescing B concurrent calls into one FAISS search and one ranker call saves.

    Per-call ms of B separate calls vs one batched call (B = 4): the index search for the
    bundle's candidate count, and the ranker on that many candidates' features.
    """
    from slimrank.bundle import open_bundle
    from slimrank.serving.loader import load_snapshot

    snapshot = load_snapshot(open_bundle(bundles))
    search = getattr(snapshot, "search", None) or snapshot.retrieve  # (B, d), n -> (B, n) x2
    b = 4
    m = snapshot.n_candidates or 200
    vectors = np.ascontiguousarray(snapshot.user_vectors[:b])  # (B, d)
    rng = np.random.default_rng(0)
    feats = [
        rng.standard_normal((m, ranker_width(snapshot))).astype(np.float32) for _ in range(b)
    ]  # B x (m, F)
    stacked = np.concatenate(feats)  # (B m, F)
    sep_search = percentiles_ms(lambda i: [search(vectors[j : j + 1], m) for j in range(b)], n)
    one_search = percentiles_ms(lambda i: search(vectors, m), n)
    sep_rank = percentiles_ms(lambda i: [snapshot.score(f) for f in feats], n)
    one_rank = percentiles_ms(lambda i: snapshot.score(stacked), n)
    return {
        "batch": b,
        "search_ms_per_call_separate": round(sep_search["p50_ms"] / b, 4),
        "search_ms_per_call_batched": round(one_search["p50_ms"] / b, 4),
        "rank_ms_per_call_separate": round(sep_rank["p50_ms"] / b, 4),
        "rank_ms_per_call_batched": round(one_rank["p50_ms"] / b, 4),
    }


def loadgen_ceiling(
    bundles: Path, mode: Mode, requests: list[bytes], rates: list[float], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The load generator's own limit: each client against the echo of ``mode``, fast rates."""
    out = []
    server, balance_dir = start_mode(mode, "echo", bundles)
    try:
        for client in ("aio", "sync"):
            for rate in rates:
                ns = argparse.Namespace(**{**vars(args), "client": client})
                run = load_run(
                    server,
                    mode,
                    "echo",
                    requests,
                    rate,
                    args.duration,
                    ns,
                    balance_dir if client == "aio" else None,
                )
                log.info(
                    "loadgen %-4s %5.0f/s: lag p50 %.2f p99 %.2f ms, %.3f ms CPU per call, "
                    "echo p99 %.2f ms",
                    client,
                    rate,
                    run.send_lag_p50_ms,
                    run.send_lag_p99_ms,
                    run.loadgen_cpu_ms_per_call,
                    run.p99_ms,
                )
                out.append({"client": client, **dataclasses.asdict(run)})
    finally:
        server.stop()
    return out


def summarize(runs: list[Run], echo: list[Run]) -> dict[str, Any]:
    """One mode and variant: highest held rate, latency at 50 and 400/s, the overload run."""
    normal = [r for r in runs if "overload" not in r.variant]
    over = next((r for r in runs if "overload" in r.variant), None)
    held = [r for r in normal if r.held]
    top = max(held, key=lambda r: r.offered_rate) if held else None

    def at(rs: list[Run], rate: float) -> dict[str, Any] | None:
        r = next((x for x in rs if x.offered_rate == rate), None)
        if r is None:
            return None
        return {
            "p50_ms": round(r.p50_ms, 2),
            "p99_ms": round(r.p99_ms, 2),
            "refused": r.refused,
            "failed": sum(r.failed.values()),
        }

    busy = [r for r in normal if r.offered_rate >= 100 and r.sent - r.ok <= 0.05 * r.sent]
    out: dict[str, Any] = {
        "highest_held": None if top is None else top.offered_rate,
        "held_rates": [r.offered_rate for r in held],
        "server_cores_at_highest": None if top is None else top.server_cpu_cores,
        # Server CPU per answered call (ms), the median over the unsaturated runs >= 100/s: a
        # measure of cost that the other tenants of the machine disturb less than latency.
        "server_cpu_ms_per_call": (
            round(float(np.median([1000 * r.server_cpu_cores / r.goodput for r in busy])), 3)
            if busy
            else None
        ),
        "server_rss_mib": max((r.server_rss_mib for r in runs), default=float("nan")),
        "at_50": at(normal, 50),
        "at_400": at(normal, 400),
        "echo_at_50": at(echo, 50),
        "echo_at_400": at(echo, 400),
    }
    r400 = at(normal, 400)
    out["p99_le_10ms_at_400_clean"] = (
        None if r400 is None else r400["p99_ms"] <= 10 and not r400["refused"] + r400["failed"]
    )
    if over is not None:
        out["overload"] = {
            "offered": over.offered_rate,
            "goodput": over.goodput,
            "goodput_at_capacity": None if top is None else top.goodput,
            "accepted_p99_ms": round(over.p99_ms, 2),
            "refused": over.refused,
            "refusal_p99_ms": round(over.refusal_p99_ms, 2),
            "failed": over.failed,
            "sent": over.sent,
        }
    return out


def run_ml100k(args: argparse.Namespace) -> int:
    """Every mode on the ml-100k bundle (and the fastfeat variant), with its echo and overload."""
    if not (args.demo_bundles / "CURRENT").is_file():
        log.error("no %s/CURRENT: run make demo first", args.demo_bundles)
        return 1
    import grpc

    modes = [MODES[m] for m in args.modes.split(",")]
    variants = args.variants.split(",")
    rates = [float(r) for r in args.ml_rates.split(",")]
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    requests = demo_requests_from(args.demo_bundles)
    floors = in_process_floors(args.demo_bundles, args.floor_calls)
    log.info("in-process floors: %s", json.dumps(floors))
    batching = batching_floor(args.demo_bundles, args.floor_calls)
    log.info("batching: %s", batching)
    all_runs: list[Run] = []
    summary: dict[str, dict[str, Any]] = {}
    if "teacher" in variants and not (args.teacher_bundles / "CURRENT").is_file():
        log.error("no %s/CURRENT: run bench/online_path.py first", args.teacher_bundles)
        return 1
    for mode in modes:
        by_variant = {
            variant: sweep_mode(
                mode, variant, variant_bundles(variant, args), requests, rates, args, True
            )
            for variant in variants
        }
        # The floor: the echo through the same server at the rates the variants ran.
        ran = {r.offered_rate for runs in by_variant.values() for r in runs}
        echo_rates = [r for r in rates if r in ran]
        echo = sweep_mode(mode, "echo", args.demo_bundles, requests, echo_rates, args, False)
        all_runs += echo
        for variant, runs in by_variant.items():
            all_runs += runs
            summary[f"{mode.name} / {variant}"] = summarize(runs, echo)
    ceiling: list[dict[str, Any]] = []
    if args.loadgen_ceiling:
        best = MODES[args.ceiling_mode]
        ceiling = loadgen_ceiling(
            args.demo_bundles,
            best,
            requests,
            [float(r) for r in args.ceiling_rates.split(",")],
            args,
        )
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}",
        "cpu": cpu_features(),
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "bundle": str(args.demo_bundles),
        "bundle_version": (args.demo_bundles / "CURRENT").read_text().strip(),
        "featurizer": featurizer_note(),
        "client": args.client,
        "channels": args.channels,
        "duration_s_per_rate": args.duration,
        "min_calls": args.min_calls,
        "modes": {m.name: dataclasses.asdict(m) for m in modes},
        "summary": summary,
        "floors": floors,
        "batching": batching,
        "loadgen_ceiling": ceiling,
        "runs": [dataclasses.asdict(r) for r in all_runs],
        "command": shlex.join(sys.argv),
    }
    if "teacher" in variants:
        report["teacher_bundle_version"] = (args.teacher_bundles / "CURRENT").read_text().strip()
        report["end_to_end"] = end_to_end(summary, RESULTS / "online_path.json")
    md = modes_markdown(report)
    print(md)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.results}.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / f"{args.results}.md").write_text(md)
        log.info("wrote %s.json and .md in %s", args.results, RESULTS)
    return 0


def variant_bundles(variant: str, args: argparse.Namespace) -> Path:
    """The bundles a variant serves: the teacher's (bench/online_path.py) or the demo's."""
    return args.teacher_bundles if variant == "teacher" else args.demo_bundles


def end_to_end(summary: dict[str, dict[str, Any]], online_path: Path) -> dict[str, Any]:
    """Per mode, the served int8 student against the teacher behind the same server and
    features, from this run: server CPU per call, p50 at 50 calls/s and the highest rate held;
    beside them the ranker-only speed-up of ``bench/online_path.py`` (its last saved run)."""
    out: dict[str, Any] = {}
    for key, student in summary.items():
        mode, variant = key.split(" / ")
        teacher = summary.get(f"{mode} / teacher")
        if variant != "ml100k" or teacher is None:
            continue
        row: dict[str, Any] = {}
        cpu_s, cpu_t = student["server_cpu_ms_per_call"], teacher["server_cpu_ms_per_call"]
        if cpu_s and cpu_t:
            row["cpu_ms_per_call"] = [cpu_t, cpu_s]
            row["cpu_speedup"] = round(cpu_t / cpu_s, 2)
        if student["at_50"] and teacher["at_50"]:
            row["p50_at_50"] = [teacher["at_50"]["p50_ms"], student["at_50"]["p50_ms"]]
            row["p50_speedup"] = round(teacher["at_50"]["p50_ms"] / student["at_50"]["p50_ms"], 2)
        row["held"] = [teacher["highest_held"], student["highest_held"]]
        out[mode] = row
    if online_path.is_file():
        ranker = json.loads(online_path.read_text())
        out["ranker_only"] = {
            "speedup_p50": ranker.get("ranker_speedup_p50"),
            "date": ranker.get("date"),
            "bundle": ranker.get("bundle"),
        }
    return out


def featurizer_note() -> str:
    """Which featurizer the numbers are with: the last commit of ranking/features.py."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%h %cs %s", "--", "slimrank/ranking/features.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def demo_requests_from(bundles: Path, n: int = 1000) -> list[bytes]:
    """Recommend requests (k = 10) for random known users of the bundle."""
    from slimrank.bundle import open_bundle
    from slimrank.serving.loader import load_snapshot

    return recommend_requests(load_snapshot(open_bundle(bundles)).user_ids, n)


def recommend_requests(users: np.ndarray, n: int = 1000) -> list[bytes]:
    """Recommend requests (k = 10) for ``n`` random ones of the known ``users`` ids."""
    from slimrank.serving.proto.slimrank.v1 import recommender_pb2

    pick = np.random.default_rng(1).integers(0, len(users), size=n)
    return [
        recommender_pb2.RecommendRequest(user_id=str(users[u]), k=K).SerializeToString()
        for u in pick
    ]


def _steal(value: float | None) -> str:
    """A run's steal share; "-" for runs recorded before it was, or off Linux."""
    return "-" if value is None else f"{value:.1f}"


def _fmt(p: dict[str, Any] | None) -> str:
    if p is None:
        return "-"
    bad = p["refused"] + p["failed"]
    return f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f}" + (f" ({bad} bad)" if bad else "")


def modes_markdown(report: dict[str, Any]) -> str:
    cpu = report["cpu"]
    lines = [
        "# Serving modes on the ml-100k bundle (open loop)",
        "",
        f"{report['date']} · {report['machine']} · {cpu['model']} · flags "
        f"{' '.join(cpu['flags']) or '-'} · load average before/after "
        f"{report['loadavg_before']} / {report['loadavg_after']}",
        "",
        f"Bundle `{report['bundle_version']}`; featurizer at `{report['featurizer']}`. "
        f"Client: {report['client']} load generator in its own process, "
        f"{report['channels']} connections, pre-serialized requests; "
        f"{report['duration_s_per_rate']:.0f} s per rate (at least {report['min_calls']} calls). "
        f"Held = p99 <= {HOLD_P99_MS:.0f} ms with at most {HOLD_MAX_BAD:.1%} of calls refused "
        "or failed. Latency is from the scheduled send time, in ms (p50 / p99).",
        "",
        "| mode | variant | held calls/s | server CPU ms/call | cores at held | RSS MiB | "
        "p50 / p99 at 50/s | echo at 50/s | p50 / p99 at 400/s | echo at 400/s | "
        "overload offered | goodput (at capacity) | accepted p99 | refused | refusal p99 | "
        "other failures |",
        "|---|---|---:|---:|---:|---:|---|---|---|---|---:|---|---:|---:|---:|---|",
    ]
    for key, s in report["summary"].items():
        mode, variant = key.split(" / ")
        o = s.get("overload")
        over = (
            [
                f"{o['offered']:.0f}",
                f"{o['goodput']:.0f} ({o['goodput_at_capacity']:.0f})",
                f"{o['accepted_p99_ms']:.1f}",
                f"{o['refused']}/{o['sent']}",
                f"{o['refusal_p99_ms']:.1f}",
                ", ".join(f"{k} {v}" for k, v in o["failed"].items()) or "0",
            ]
            if o
            else ["-"] * 6
        )
        held = "-" if s["highest_held"] is None else f"{s['highest_held']:.0f}"
        cores = (
            "-" if s["server_cores_at_highest"] is None else f"{s['server_cores_at_highest']:.2f}"
        )
        cpu = "-" if s["server_cpu_ms_per_call"] is None else f"{s['server_cpu_ms_per_call']:.2f}"
        lines.append(
            f"| {mode} | {variant} | {held} | {cpu} | {cores} | "
            f"{s.get('server_rss_mib', float('nan')):.0f} | {_fmt(s['at_50'])} | "
            f"{_fmt(s['echo_at_50'])} | {_fmt(s['at_400'])} | {_fmt(s['echo_at_400'])} | "
            + " | ".join(over)
            + " |"
        )
    lines += ["", "Modes:", ""]
    for name, m in report["modes"].items():
        lines.append(
            f"- `{name}`: {m['about']} (engine {m['engine']}, handler threads "
            f"{m['handler_threads']}, workers {m['workers']}, max_inflight {m['max_inflight']}, "
            f"max_wait {m['max_wait_s']}, burst wait {m.get('burst_wait_s')}, burst recovery "
            f"{m.get('burst_recovery_s', 0.0)}, "
            f"switch interval {m['switch_interval_s'] or 'default'}, "
            f"core queue {_core_queue(m)})"
        )
    if report.get("end_to_end"):
        lines += [
            "",
            f"The int8 student (bundle `{report['bundle_version']}`) against the fp32 teacher "
            f"(bundle `{report['teacher_bundle_version']}`: the same bundle, its ranker replaced "
            "by the teacher's ONNX export) behind the same server, features and client, in "
            "this run:",
            "",
            "| mode | server CPU ms/call teacher -> student | speed-up | p50 at 50/s teacher -> "
            "student | speed-up | held calls/s teacher -> student |",
            "|---|---|---:|---|---:|---|",
        ]
        for mode, row in report["end_to_end"].items():
            if mode == "ranker_only":
                continue
            cpu = row.get("cpu_ms_per_call")
            p50 = row.get("p50_at_50")
            lines.append(
                f"| {mode} | {'-' if cpu is None else f'{cpu[0]:.2f} -> {cpu[1]:.2f}'} | "
                f"{_times(row.get('cpu_speedup'))} | "
                f"{'-' if p50 is None else f'{p50[0]:.2f} -> {p50[1]:.2f}'} | "
                f"{_times(row.get('p50_speedup'))} | "
                f"{row['held'][0] or 'none'} -> {row['held'][1] or 'none'} |"
            )
        ranker = report["end_to_end"].get("ranker_only")
        if ranker:
            lines += [
                "",
                f"Ranker alone, same features, in process (`bench/online_path.py`, "
                f"{ranker['date']}, bundle `{ranker['bundle']}`): the teacher takes "
                f"{ranker['speedup_p50']}x the int8 student's p50.",
            ]
    lines += ["", "In-process costs per call (one core, this process):", ""]
    lines += ["| stage | p50 ms | p99 ms |", "|---|---:|---:|"]
    for stage, p in report["floors"].items():
        if "mean_ms" in p:
            lines.append(f"| {stage} | {p['mean_ms']:.3f} (mean) | |")
        else:
            lines.append(f"| {stage} | {p['p50_ms']:.3f} | {p['p99_ms']:.3f} |")
    b = report["batching"]
    lines += [
        "",
        f"Batching {b['batch']} calls into one: FAISS search {b['search_ms_per_call_separate']:.3f}"
        f" -> {b['search_ms_per_call_batched']:.3f} ms per call, ranker "
        f"{b['rank_ms_per_call_separate']:.3f} -> {b['rank_ms_per_call_batched']:.3f} ms per call.",
    ]
    if report["loadgen_ceiling"]:
        lines += [
            "",
            "Load generator ceiling (against the echo):",
            "",
            "| client | offered/s | send lag p50 / p99 ms | CPU ms per call | echo p50 / p99 ms |",
            "|---|---:|---|---:|---|",
        ]
        for r in report["loadgen_ceiling"]:
            lines.append(
                f"| {r['client']} | {r['offered_rate']:.0f} | {r['send_lag_p50_ms']:.2f} / "
                f"{r['send_lag_p99_ms']:.2f} | {r['loadgen_cpu_ms_per_call']:.3f} | "
                f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} |"
            )
    lines += [
        "",
        "All runs:",
        "",
        "| mode | variant | offered/s | goodput | p50 | p95 | p99 | max | refused | refusal p99 "
        "| failed | lag p99 | server cores | server RSS MiB | load before -> after | steal % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in report["runs"]:
        failed = ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "0"
        lines.append(
            f"| {r['mode']} | {r['variant']} | {r['offered_rate']:.0f} | {r['goodput']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | "
            f"{r['refused']} | {r['refusal_p99_ms']:.2f} | {failed} | {r['send_lag_p99_ms']:.2f} "
            f"| {r['server_cpu_cores']:.2f} | {r.get('server_rss_mib', float('nan')):.0f} "
            f"| {r['loadavg_before'][0]} -> "
            f"{r['loadavg_after'][0]} | {_steal(r.get('steal_pct'))} |"
        )
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets", default="scale,ml100k", help="scale and/or ml100k (default both)"
    )
    parser.add_argument("--quick", action="store_true", help="scale: 3 s per rate")
    parser.add_argument(
        "--scale-size",
        default=os.environ.get(SCALE_SIZE_ENV, "1000000x1000000x20"),
        help=f"scale: USERSxITEMSxPER_USER of the world (${SCALE_SIZE_ENV})",
    )
    parser.add_argument(
        "--scale-override",
        default=os.environ.get(SCALE_OVERRIDE_ENV, ""),
        help=f'scale: JSON overrides of scale.toml, e.g. {{"teacher.train.epochs": 1}} '
        f"(${SCALE_OVERRIDE_ENV})",
    )
    parser.add_argument(
        "--scale-bundles",
        type=Path,
        default=None,
        help="scale: serve this published bundles root (e.g. a bench/scale_steps.py --name "
        "run's) instead of the one --scale-size and --scale-override name",
    )
    parser.add_argument("--rates", default="50,100,200,400,800", help="scale: offered calls/s")
    parser.add_argument("--duration", type=float, default=0, help="seconds per rate")
    parser.add_argument("--workers", default="1,2", help="scale: server processes to compare")
    parser.add_argument("--modes", default=DEFAULT_MODES, help="ml100k: server modes to compare")
    parser.add_argument(
        "--variants",
        default="ml100k,fastfeat",
        help="ml100k: the bundle as is, fastfeat, and/or teacher (the teacher's fp32 ranker "
        "behind the same server and features)",
    )
    parser.add_argument(
        "--ml-rates",
        default="50,100,200,300,400,500,600,800,1000,1200,1400,1600,2000,2400",
        help="ml100k: offered calls/s, in order until one is not held",
    )
    parser.add_argument("--client", choices=("aio", "sync"), default="aio", help="load generator")
    parser.add_argument("--channels", type=int, default=8, help="connections the client opens")
    parser.add_argument(
        "--min-calls", type=int, default=1000, help="ml100k: calls per rate, at least"
    )
    parser.add_argument("--floor-calls", type=int, default=500, help="ml100k: in-process timings")
    parser.add_argument("--demo-bundles", type=Path, default=DEMO_BUNDLES, help="ml100k bundles")
    parser.add_argument(
        "--teacher-bundles",
        type=Path,
        default=HERE / ".cache" / "teacher_bundles",
        help="ml100k variant teacher: the bundles bench/online_path.py publishes",
    )
    parser.add_argument(
        "--results",
        default="serving_modes",
        help="ml100k: name of the results files in bench/results (default %(default)s)",
    )
    parser.add_argument(
        "--loadgen-ceiling", action="store_true", help="ml100k: measure the load generator too"
    )
    parser.add_argument("--ceiling-mode", default="aio-t1-w2", help="the echo it is measured on")
    parser.add_argument("--ceiling-rates", default="1000,2000,3000")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--role", choices=("bench", "serve", "echo", "mode-serve"), default="bench")
    parser.add_argument("--bundles", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.role == "serve":
        return role_serve(args.bundles, args.n)
    if args.role == "echo":
        return role_echo(args.n)
    if args.role == "mode-serve":
        return role_mode_serve(args.spec)
    targets = args.targets.split(",")
    code = 0
    if "scale" in targets:
        code |= run_scale(args)
    if "ml100k" in targets:
        args.duration = args.duration or 10.0
        code |= run_ml100k(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
