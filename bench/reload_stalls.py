"""Where a reload stalls the event loop: a loop-lag probe beside an in-process reload.

    .venv/bin/python bench/reload_stalls.py --bundles ROOT [--threshold-ms 5] [--rounds 2]

The server answers calls on an asyncio event loop while a reload loads the next snapshot on a
thread; whatever holds the GIL on that thread holds up every call. This bench reproduces that
in one process, without gRPC: the main thread runs an event loop whose only task is a probe
that sleeps 1 ms and records how late it wakes up, while a thread does what a reload does
(``BundleSource`` verifies and loads ``CURRENT`` beside the served snapshot, ``warm_up``, the
swap, and the old snapshot dropped). Each step of the reload is timed by wrapping the
functions it calls, so every stall over ``--threshold-ms`` is named by the steps it overlaps.

The bundles root is only read. Writes ``bench/results/reload_stalls_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import importlib
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))

# The functions a reload calls, by module; each call is one named step of the timeline.
STEPS = (
    ("slimrank.serving.reload", "open_bundle"),
    ("slimrank.serving.reload", "load_snapshot"),
    ("slimrank.serving.pipeline_loader", "_ids"),
    ("slimrank.serving.pipeline_loader", "_vectors"),
    ("slimrank.serving.pipeline_loader", "read_npy"),
    ("slimrank.serving.pipeline_loader", "load_spec"),
    ("slimrank.serving.pipeline_loader", "load_history_encoder"),
    ("slimrank.serving.pipeline_loader", "load_catalog"),
    ("slimrank.serving.pipeline_loader", "bundle_metadata"),
    ("slimrank.ranking.feature_io", "load_tables"),
    ("slimrank.ranking.feature_io", "read_tensors"),
    ("slimrank.serving.history_encoder", "read_tensors_np"),
    ("slimrank.ranking.feature_io", "FeatureTables"),
    ("slimrank.retrieval.index_io", "load_index"),
    ("slimrank.retrieval.index_io", "_read_faiss"),
    ("slimrank.compression.scorer", "Scorer"),
    ("slimrank.serving.featurizer", "RequestFeaturizer"),
    ("slimrank.serving.snapshot", "ModelSnapshot.__post_init__"),
)


class Timeline:
    """Named ``(step, start, end)`` intervals, in ``time.perf_counter`` seconds."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spans.append((name, start, time.perf_counter()))

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if isinstance(fn, type):  # a class: time its construction, keep isinstance working

            class Timed(fn):  # type: ignore[misc, valid-type]
                def __init__(inner, *args: Any, **kwargs: Any) -> None:
                    with self.step(name):
                        super().__init__(*args, **kwargs)

            Timed.__name__ = fn.__name__
            Timed.__qualname__ = fn.__qualname__
            return Timed

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.step(name):
                return fn(*args, **kwargs)

        return timed


def instrument(timeline: Timeline) -> None:
    """Wrap every function of :data:`STEPS` where the reload looks it up."""
    for module_name, attr in STEPS:
        owner: Any = importlib.import_module(module_name)
        *outer, name = attr.split(".")
        for part in outer:
            owner = getattr(owner, part)
        original = getattr(owner, name, None)
        if original is None:
            continue
        setattr(owner, name, timeline.wrap(attr, original))


def runqueue_wait_s(tid: int | None = None) -> float:
    """Seconds thread ``tid`` (None: the caller) has spent runnable but waiting for a CPU
    (Linux schedstat; 0 elsewhere). A thread waiting for the GIL sleeps on a lock and does
    not count."""
    try:
        with open(f"/proc/self/task/{tid or threading.get_native_id()}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def loader_wait_s() -> float:
    """Run-queue wait of the reload's loading thread (0 while there is none)."""
    for thread in threading.enumerate():
        if thread.name == "slimrank-load" and thread.native_id is not None:
            return runqueue_wait_s(thread.native_id)
    return 0.0


async def probe(
    period_s: float, stop: threading.Event, lags: list[tuple[float, float, float, float]]
) -> None:
    """Sleep ``period_s`` again and again; record ``(woke, lateness, cpu wait, loader's cpu
    wait)`` of every wake-up: how long the loop's thread, and the loading thread, waited for
    a CPU meanwhile."""
    while not stop.is_set():
        waited, loader = runqueue_wait_s(), loader_wait_s()
        due = time.perf_counter() + period_s
        await asyncio.sleep(period_s)
        now = time.perf_counter()
        lags.append((now, now - due, runqueue_wait_s() - waited, loader_wait_s() - loader))


def reload_once(root: Path, holder: dict[str, Any], timeline: Timeline) -> None:
    """What ``BundleWatcher._reload`` does: load beside the served snapshot, warm up, swap,
    drop the old one."""
    from slimrank.serving.reload import BundleSource
    from slimrank.serving.snapshot import warm_up

    with timeline.step("reload"):
        snapshot = BundleSource(root)(None)
        with timeline.step("warm_up"):
            warm_up(snapshot)
        previous, holder["snapshot"] = holder["snapshot"], snapshot
        with timeline.step("drop old snapshot"):
            del previous
        del snapshot


def stalls(
    lags: list[tuple[float, float, float, float]],
    spans: list[tuple[str, float, float]],
    threshold_s: float,
) -> list[dict[str, Any]]:
    """Every wake-up later than ``threshold_s``, with the steps its stalled stretch overlaps
    (innermost first: the shortest spans)."""
    out = []
    for woke, late, cpu_wait, loader_wait in lags:
        if late < threshold_s:
            continue
        start = woke - late
        inside = sorted(
            (s for s in spans if s[1] < woke and s[2] > start), key=lambda s: s[2] - s[1]
        )
        out.append(
            {
                "at_s": start,
                "lag_ms": round(late * 1e3, 1),
                "cpu_wait_ms": round(cpu_wait * 1e3, 1),
                "loader_cpu_wait_ms": round(max(0.0, loader_wait) * 1e3, 1),
                "steps": [name for name, _, _ in inside],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=Path, required=True, help="bundles root (only read)")
    parser.add_argument("--name", default="scale_1m")
    parser.add_argument("--rounds", type=int, default=2, help="reloads, one after another")
    parser.add_argument("--threshold-ms", type=float, default=5.0)
    parser.add_argument("--period-ms", type=float, default=1.0)
    parser.add_argument(
        "--nice",
        type=int,
        default=None,
        help="the loading thread's niceness (default: the server's)",
    )
    args = parser.parse_args()

    from slimrank.serving import reload

    if args.nice is not None:
        reload.RELOAD_NICE = args.nice

    from slimrank.serving.reload import load_current

    load_before = os.getloadavg()
    started = time.perf_counter()
    holder: dict[str, Any] = {"snapshot": load_current(args.bundles)}
    startup_s = time.perf_counter() - started
    timeline = Timeline()
    instrument(timeline)
    gc_spans: list[tuple[str, float, float]] = []
    gc_start: dict[str, float] = {}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start["t"] = time.perf_counter()
        else:
            gc_spans.append((f"gc gen{info['generation']}", gc_start["t"], time.perf_counter()))

    gc.callbacks.append(on_gc)
    lags: list[tuple[float, float, float, float]] = []
    stop = threading.Event()
    reloads: list[float] = []

    def run() -> None:
        time.sleep(0.5)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            reload_once(args.bundles, holder, timeline)
            reloads.append(time.perf_counter() - t0)
            time.sleep(0.5)
        stop.set()

    loader = threading.Thread(target=run)
    t_zero = time.perf_counter()
    loader.start()
    asyncio.run(probe(args.period_ms / 1e3, stop, lags))
    loader.join()
    gc.callbacks.remove(on_gc)
    spans = timeline.spans + gc_spans
    found = stalls(lags, spans, args.threshold_ms / 1e3)
    lag_ms = sorted(lag[1] * 1e3 for lag in lags)
    result = {
        "bundles": str(args.bundles),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "startup_s": round(startup_s, 2),
        "reload_s": [round(r, 2) for r in reloads],
        "threshold_ms": args.threshold_ms,
        "reload_nice": reload.RELOAD_NICE,
        "wakeups": len(lags),
        "lag_p50_ms": round(lag_ms[len(lag_ms) // 2], 2),
        "lag_p99_ms": round(lag_ms[int(len(lag_ms) * 0.99)], 2),
        "lag_max_ms": round(lag_ms[-1], 1),
        "stalls_n": len(found),
        "stalls_total_ms": round(sum(s["lag_ms"] for s in found), 1),
        "stalls_not_waiting_for_cpu_ms": round(
            sum(max(0.0, s["lag_ms"] - s["cpu_wait_ms"]) for s in found), 1
        ),
        "stalls": [{**s, "at_s": round(s["at_s"] - t_zero, 3)} for s in found],
        "steps": [
            {"step": n, "start_s": round(a - t_zero, 3), "ms": round((b - a) * 1e3, 1)}
            for n, a, b in sorted(spans, key=lambda s: s[1])
            if b - a >= 1e-3
        ],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"reload_stalls_{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"reload_stalls_{args.name}.md").write_text(markdown(result, args))
    print(markdown(result, args))


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"# Event-loop stalls during a reload: `{result['bundles']}`",
        "",
        f"{result['date']} · {result['machine']} · load average before/after "
        f"{result['load_average_before']} / {result['load_average_after']}",
        "",
        f"Start-up (verify, load, warm up) {result['startup_s']} s; reloads "
        f"{', '.join(f'{r} s' for r in result['reload_s'])}. The probe woke "
        f"{result['wakeups']} times (every {args.period_ms:g} ms): lateness p50 "
        f"{result['lag_p50_ms']} ms, p99 {result['lag_p99_ms']} ms, max "
        f"{result['lag_max_ms']} ms.",
        "",
        f"## Stalls over {result['threshold_ms']:g} ms",
        "",
        f"{result['stalls_n']} stalls, {result['stalls_total_ms']} ms in all, of which "
        f"{result['stalls_not_waiting_for_cpu_ms']} ms not waiting for a CPU (the GIL, or the "
        "machine: see below).",
        "",
        "The loop's thread waits either for the GIL or for a CPU (runnable, not running: "
        "the cores are busy); the second is measured (schedstat). The rest is the GIL, or "
        "the machine: this VM also stalls a lone event loop for ~28 ms with no CPU wait "
        "while another process hashes the same files. "
        "The loading thread's own wait for a CPU in the same stretch is beside it (a thread "
        "that holds the GIL and waits for a CPU holds up the loop too).",
        "",
        f"Loading thread niced by {result['reload_nice']}.",
        "",
        "| at (s) | lag (ms) | loop waiting for a CPU (ms) | loader waiting for a CPU (ms) "
        "| during (innermost first) |",
        "|---:|---:|---:|---:|---|",
    ]
    for s in result["stalls"]:
        lines.append(
            f"| {s['at_s']} | {s['lag_ms']} | {s['cpu_wait_ms']} | {s['loader_cpu_wait_ms']} | "
            f"{' < '.join(s['steps']) or '-'} |"
        )
    if not result["stalls"]:
        lines.append("| - | - | - | - | none |")
    lines += [
        "",
        "Command: `bench/reload_stalls.py --bundles "
        f"{args.bundles} --name {args.name} --rounds {args.rounds} --nice {result['reload_nice']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
