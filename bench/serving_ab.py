"""Two code trees serving one bundle in alternation, open loop: what a server change does.

    .venv/bin/python bench/serving_ab.py --a old=../wt-old --b new=. --rate 400 --pairs 12

    .venv/bin/python bench/serving_ab.py --a w5=. --b w2=. --b-flags "--max-wait-ms 2"

Each tree is a checkout of slimrank (``git worktree add ../wt-old <rev>``), or the same tree
for both with each variant's own flags (``--a-flags``, ``--b-flags``; the flags after ``--``
go to both) and environment (``--a-env``, ``--b-env`` KEY=VALUE); its ``slimrank
serve`` subprocess runs in that directory (``python -m`` puts it first on ``sys.path``), so
both variants run from this venv with the same libraries, and before the first run the tool
checks that each tree's server imports its own ``slimrank``. (Until 2026-12-01 the tool put
the tree on ``PYTHONPATH`` and started every server in this checkout, whose ``slimrank`` came
first: both variants served this checkout's code.) Pair i serves the bundle with one tree
and then the other (the order alternates from pair to pair, so a drift of the machine's
speed favours neither) and offers each the same seeded Poisson schedule of ``--calls``
Recommend calls at ``--rate``/s
(``bench/loadgen.py``, 2 s deadlines, known users of the bundle). Per run it records the
calls answered, refused (RESOURCE_EXHAUSTED) and failed otherwise, p50/p99 of the answered
ones and of the refused ones from their scheduled send, the server's CPU time per call, its
counters, the load average, and the share of the machine's CPU time the hypervisor stole
for other guests during the run (``/proc/stat``'s steal); the summary gives each variant's
medians and, pair by pair, how often B refused fewer calls than A. With ``--freeze G`` each
server is stopped (SIGSTOP) for G seconds at ``--freeze-at`` into the schedule, as this VM
at times freezes a process (the load generator sends on meanwhile). The machine's speed
changes between runs on a shared VM (CPU per call and steal are printed beside each run for
that reason), so compare within pairs.

With ``--batch-beside N`` an offline job runs beside the schedule in every run: one client
sends ``RecommendBatch`` calls of N of the same users' requests back to back (a refused one
is sent again after 50 ms) until the schedule ends; the batches answered and refused, and
the answered ones' p50, are recorded beside the online calls' figures.

With ``--b-front "--rate 400"`` or ``--b-front "--in-flight 2"`` (or ``--a-front``) that
variant's calls go through a ``slimrank front`` (nginx for a rate, HAProxy for calls in
flight; started from the same tree, with those flags, an ``--upstream`` among them
overriding the server's address) in front of its server: the front's refusals, its proxy's
CPU time per call and its call counts are recorded beside the server's. It needs Debian's
nginx or haproxy: ``make test`` installs both, ``make install`` does not (``sudo
scripts/install_nginx.sh``, ``sudo scripts/install_haproxy.sh``).

Writes ``bench/results/serving_ab_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import drive, job_for
from serving import (
    ROOT,
    ServerProcess,
    _cpu_seconds,
    checkout,
    cpu_features,
    demo_requests_from,
    imported_tree,
    metric_samples,
    stop_process,
)

from slimrank.compression.cpu import cpu_times, steal_share

RECOMMEND = "/slimrank.v1.Recommender/Recommend"
COUNTERS = ("slimrank_shed_requests_total", "slimrank_stalls_total")
FRONT_READY = re.compile(r"front on (\S+):(\d+) metrics (\S+) pid (\d+)")


class BatchJob:
    """A thread sending ``RecommendBatch`` calls of ``size`` requests back to back to
    ``target`` until :meth:`stop`: an offline job beside the online schedule."""

    def __init__(self, target: str, requests: list[bytes], size: int) -> None:
        import grpc

        from slimrank.serving.proto.slimrank.v1 import recommender_pb2

        self._channel = grpc.insecure_channel(target)
        self._call = self._channel.unary_unary(
            "/slimrank.v1.Recommender/RecommendBatch",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        batches = [requests[i : i + size] for i in range(0, len(requests) - size + 1, size)]
        self._bodies = [
            recommender_pb2.RecommendBatchRequest(
                requests=[recommender_pb2.RecommendRequest.FromString(r) for r in batch]
            ).SerializeToString()
            for batch in batches
        ]
        self._stop = threading.Event()
        self.codes: dict[str, int] = {}
        self.latency_ms: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import grpc

        i = 0
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                self._call(self._bodies[i % len(self._bodies)], timeout=30)
                code = "OK"
                self.latency_ms.append(1000 * (time.perf_counter() - start))
            except grpc.RpcError as err:
                code = err.code().name
                self._stop.wait(0.05)
            self.codes[code] = self.codes.get(code, 0) + 1
            i += 1

    def stop(self) -> dict[str, Any]:
        """Stop after the call in flight; return the batches' figures."""
        self._stop.set()
        self._thread.join(60)
        self._channel.close()
        p50 = float(np.percentile(self.latency_ms, 50)) if self.latency_ms else None
        return {
            "batches": dict(self.codes),
            "batch_p50_ms": None if p50 is None else round(p50, 1),
        }


class FrontProcess:
    """``slimrank front`` (from ``tree``) in front of ``upstream``, and its proxy's CPU time."""

    def __init__(self, tree: Path, upstream: str, flags: list[str]) -> None:
        argv = [sys.executable, "-m", "slimrank.cli", "front", "--upstream", upstream]
        argv += ["--port", "0", "--metrics-port", "0", *flags]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=tree)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = FRONT_READY.search(line)
        if match is None:
            self.stop()
            raise RuntimeError(f"slimrank front did not report ready (got {line!r})")
        self.target = f"{match[1]}:{match[2]}"
        self.metrics = match[3]
        self.master = int(match[4])

    def cpu_seconds(self) -> float:
        """CPU time of the front so far: its own process (which counts the proxy's log), the
        proxy's process (nginx's master, or HAProxy), nginx's live workers, and (the
        master's ``cutime``/``cstime``) the workers a reload replaced, once reaped."""
        ticks = os.sysconf("SC_CLK_TCK")
        fields = Path(f"/proc/{self.master}/stat").read_text().rsplit(")", 1)[1].split()
        own = sum(int(f) for f in fields[11:15]) / ticks  # utime stime cutime cstime
        children = Path(f"/proc/{self.master}/task/{self.master}/children").read_text().split()
        return own + _cpu_seconds([self.proc.pid, *(int(pid) for pid in children)])

    def calls(self) -> dict[str, float]:
        """``slimrank_front_calls_total`` by outcome."""
        return {
            s.labels["outcome"]: s.value
            for s in metric_samples(self.metrics) or []
            if s.name == "slimrank_front_calls_total"
        }

    def stop(self) -> None:
        stop_process(self.proc)


def variant(spec: str) -> tuple[str, Path]:
    """``label=path`` -> (label, the checkout's absolute path), checked."""
    label, sep, path = spec.partition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"{spec!r}: want LABEL=PATH of a slimrank checkout")
    return label, checkout(path)


def add_tree_args(parser: argparse.ArgumentParser) -> None:
    """``--a`` and ``--b`` (LABEL=PATH of two checkouts) and ``--bundles``: what every A/B
    bench of two code trees takes; check them with :func:`check_trees`."""
    parser.add_argument("--a", type=variant, required=True, help="LABEL=PATH of the first tree")
    parser.add_argument("--b", type=variant, required=True, help="LABEL=PATH of the second tree")
    parser.add_argument("--bundles", type=Path, default=ROOT / "runs" / "demo" / "bundles")


def check_trees(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage error unless ``--bundles`` has a CURRENT, the labels differ and a server started
    in each tree imports that tree's own ``slimrank``."""
    if not (args.bundles / "CURRENT").is_file():
        parser.error(f"--bundles {args.bundles}: no CURRENT there (run `make demo` first)")
    if args.a[0] == args.b[0]:
        parser.error("--a and --b need different labels")
    for flag, (label, tree) in (("--a", args.a), ("--b", args.b)):
        served = imported_tree(tree)
        if served != tree:
            parser.error(f"{flag} {label}: a server started in {tree} imports {served}'s slimrank")


def alternating(pair: int, a: tuple[str, Path], b: tuple[str, Path]) -> list[tuple[str, Path]]:
    """The order of pair ``pair``'s two runs: A first in even pairs, B first in odd ones, so
    a drift of the machine's speed favours neither."""
    return [a, b] if pair % 2 == 0 else [b, a]


def serve_flags(text: str) -> list[str]:
    """One variant's own ``slimrank serve`` flags, as a shell would split them."""
    try:
        return shlex.split(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def serve_env(text: str) -> tuple[str, str]:
    """One ``KEY=VALUE`` of a variant's server environment."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: want KEY=VALUE")
    return key, value


def one_run(
    label: str,
    tree: Path,
    bundles: Path,
    requests: list[bytes],
    args: argparse.Namespace,
    seed: int,
    flags: list[str] | None = None,
    env: dict[str, str] | None = None,
    front_flags: list[str] | None = None,
) -> dict[str, Any]:
    """Serve ``bundles`` from ``tree`` (with the common and this variant's ``flags``, and
    ``env`` added to the server's environment), behind ``slimrank front`` with
    ``front_flags`` unless those are None, offer the seeded schedule, return the run's
    figures."""
    argv = [sys.executable, "-m", "slimrank.cli", "serve", "--bundles", str(bundles)]
    argv += ["--port", "0", "--metrics-port", "0", *args.serve_args, *(flags or [])]
    server = ServerProcess(argv, code=tree, env=env)
    front = None
    front_figures: dict[str, Any] = {}
    try:
        target = server.target
        if front_flags is not None:
            front = FrontProcess(tree, server.target, front_flags)
            target = front.target
        cpu0 = _cpu_seconds(server.pids)
        front_cpu0 = 0.0 if front is None else front.cpu_seconds()
        freeze = None
        if args.freeze:
            freeze = {"pids": server.pids, "at_s": args.freeze_at, "for_s": args.freeze}
        job = job_for(target, RECOMMEND, requests, args.rate, args.calls, seed=seed, freeze=freeze)
        batch_job = None if not args.batch_beside else BatchJob(target, requests, args.batch_beside)
        times0 = cpu_times()
        try:
            out = drive(job, timeout_s=args.calls / args.rate + 120)
        finally:
            batch_figures = {} if batch_job is None else batch_job.stop()
        stolen = steal_share(times0, cpu_times())
        cpu = _cpu_seconds(server.pids) - cpu0
        if front is not None:
            front_cpu = front.cpu_seconds() - front_cpu0
            front_figures = {
                "front_cpu_ms_per_call": round(1000 * front_cpu / args.calls, 3),
                "front_calls": front.calls(),
            }
        counters = server.counters(*COUNTERS)
        shed_by = server.counter_by("slimrank_shed_requests_total", "reason")
    finally:
        if front is not None:
            front.stop()
        server.stop()
    codes = out["codes"]
    latency_ms = (out["done"] - out["schedule"]) * 1000
    ok = codes == 0
    answered = latency_ms[ok]
    refused = latency_ms[codes == 8]
    return {
        "variant": label,
        "pair": seed,
        "answered": int(ok.sum()),
        "refused": int((codes == 8).sum()),
        "failed_otherwise": int((~ok & (codes != 8)).sum()),
        "p50_ms": round(float(np.percentile(answered, 50)), 2) if answered.size else None,
        "p99_ms": round(float(np.percentile(answered, 99)), 2) if answered.size else None,
        # How long a refused call took to hear so (the overload criterion: within a few ms).
        "refusal_p50_ms": round(float(np.percentile(refused, 50)), 2) if refused.size else None,
        "refusal_p99_ms": round(float(np.percentile(refused, 99)), 2) if refused.size else None,
        "server_cpu_ms_per_call": round(1000 * cpu / args.calls, 3),
        "shed_counter": counters["slimrank_shed_requests_total"],
        "shed_by_reason": shed_by,
        "stalls": counters["slimrank_stalls_total"],
        "load_average_1m": round(os.getloadavg()[0], 2),
        # The share of the machine's CPU time the hypervisor gave other guests during the run.
        "steal_pct": None if stolen is None else round(100 * stolen, 1),
        **front_figures,
        **batch_figures,
    }


def summarize(runs: list[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Each variant's medians and ranges, and the pairs where B refused fewer than A."""
    by = {v: [r for r in runs if r["variant"] == v] for v in (a, b)}
    summary: dict[str, Any] = {}
    for v, rs in by.items():
        summary[v] = {
            key: {
                "median": float(np.median([r[key] for r in rs])),
                "min": min(r[key] for r in rs),
                "max": max(r[key] for r in rs),
            }
            for key in ("refused", "p99_ms", "server_cpu_ms_per_call")
        }
        for key in ("refusal_p50_ms", "refusal_p99_ms"):  # runs that refused any call
            values = [r[key] for r in rs if r.get(key) is not None]
            summary[v][key] = float(np.median(values)) if values else None
        summary[v]["runs_with_none_refused"] = sum(r["refused"] == 0 for r in rs)
    pairs = sorted({r["pair"] for r in runs})
    refused = {(r["variant"], r["pair"]): r["refused"] for r in runs}
    summary["pairs"] = len(pairs)
    summary[f"{b}_fewer_refused"] = sum(refused[b, p] < refused[a, p] for p in pairs)
    summary[f"{a}_fewer_refused"] = sum(refused[a, p] < refused[b, p] for p in pairs)
    return summary


def cpu_line(cpu: dict[str, Any]) -> str:
    """The CPU's model, core count and SIMD flags, on one line."""
    flags = " ".join(cpu.get("flags", [])) or "no AVX-512"
    return f"{cpu.get('model')}, {cpu.get('cpus')} cores, VNNI {cpu.get('vnni')}, {flags}"


def ms(value: float | None) -> str:
    """A latency in ms to two decimals; "-" when there is none (no call refused)."""
    return "-" if value is None else f"{value:.2f}"


def pct(value: float | None) -> str:
    """A percentage to one decimal; "-" when it was not measured (older runs, not Linux)."""
    return "-" if value is None else f"{value:.1f}"


def batch_cell(run: dict[str, Any]) -> str:
    """``answered / refused, p50`` of the batch job beside a run."""
    codes = run.get("batches", {})
    refused = codes.get("RESOURCE_EXHAUSTED", 0)
    other = sum(n for code, n in codes.items() if code not in ("OK", "RESOURCE_EXHAUSTED"))
    tail = f" ({other} failed otherwise)" if other else ""
    return f"{codes.get('OK', 0)} / {refused}{tail}, {ms(run.get('batch_p50_ms'))}"


def front_cpu(run: dict[str, Any]) -> str:
    """`` (+X front)``: the front's CPU per call beside the server's, for a run behind one."""
    cpu = run.get("front_cpu_ms_per_call")
    return "" if cpu is None else f" (+{cpu} front)"


def markdown(report: dict[str, Any]) -> str:
    a, b = report["variants"]
    s = report["summary"]
    # Results recorded before steal was measured render as they were committed.
    steal = any("steal_pct" in r for r in report["runs"])
    batch = bool(report.get("batch_beside"))
    lines = [
        f"# Serving A/B: {a} vs {b}",
        "",
        f"`{report['command']}`",
        "",
        f"Bundle `{report['bundles']}`, {report['calls']} Recommend calls at {report['rate']:g}/s "
        f"per run, open loop, {s['pairs']} alternated pairs"
        + (
            f", each server stopped (SIGSTOP) for {report['freeze_s']:g} s from "
            f"{report['freeze_at_s']:g} s into the schedule"
            if report.get("freeze_s")
            else ""
        )
        + (
            f", beside one client sending RecommendBatch calls of {report['batch_beside']}"
            " requests back to back"
            if batch
            else ""
        )
        + f". CPU: {cpu_line(report['cpu'])}. "
        f"Python {report['python']}. Trees: "
        + ", ".join(f"{k} `{v}`" for k, v in report["trees"].items())
        + "".join(
            f"; {k}'s own flags `{' '.join(v)}`" for k, v in report.get("flags", {}).items() if v
        )
        + "".join(
            f"; {k}'s environment `{' '.join(f'{n}={x}' for n, x in e.items())}`"
            for k, e in report.get("env", {}).items()
            if e
        )
        + "".join(
            f"; {k} behind `slimrank front {' '.join(v)}` (the front's CPU in brackets)"
            for k, v in report.get("front", {}).items()
            if v is not None
        ),
        "",
        "| variant | pair | answered | refused | other | p50 ms | p99 ms | refusal p50 / p99 ms"
        " | server CPU ms/call | stalls | load |"
        + (" steal % |" if steal else "")
        + (" batches answered / refused, p50 ms |" if batch else ""),
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"
        + ("---:|" if steal else "")
        + ("---|" if batch else ""),
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['variant']} | {r['pair']} | {r['answered']} | {r['refused']} | "
            f"{r['failed_otherwise']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{ms(r.get('refusal_p50_ms'))} / {ms(r.get('refusal_p99_ms'))} | "
            f"{r['server_cpu_ms_per_call']}{front_cpu(r)} | {r['stalls']:g} | "
            f"{r['load_average_1m']} |"
            + (f" {pct(r.get('steal_pct'))} |" if steal else "")
            + (f" {batch_cell(r)} |" if batch else "")
        )
    lines += [
        "",
        "| variant | refused, median (range) | p99 ms, median (range) | refusal p50 / p99 ms,"
        " medians | CPU ms/call, median | runs with none refused |",
        "|---|---|---|---|---:|---:|",
    ]
    for v in (a, b):
        m = s[v]
        lines.append(
            f"| {v} | {m['refused']['median']:g} ({m['refused']['min']}-{m['refused']['max']}) | "
            f"{m['p99_ms']['median']:.2f} ({m['p99_ms']['min']}-{m['p99_ms']['max']}) | "
            f"{ms(m.get('refusal_p50_ms'))} / {ms(m.get('refusal_p99_ms'))} | "
            f"{m['server_cpu_ms_per_call']['median']:.3f} | "
            f"{m['runs_with_none_refused']} of {s['pairs']} |"
        )
    lines += [
        "",
        f"Pairs where {b} refused fewer calls than {a}: {s[f'{b}_fewer_refused']} of {s['pairs']}; "
        f"the other way: {s[f'{a}_fewer_refused']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_tree_args(parser)
    parser.add_argument("--rate", type=float, default=400.0, help="Recommend calls/s offered")
    parser.add_argument("--calls", type=int, default=4000, help="calls per run")
    parser.add_argument("--pairs", type=int, default=12, help="alternated pairs of runs")
    parser.add_argument(
        "--freeze", type=float, default=0.0, help="stop each server for this many s (SIGSTOP)"
    )
    parser.add_argument(
        "--freeze-at", type=float, default=2.0, help="that many s into the schedule"
    )
    parser.add_argument(
        "--a-flags", type=serve_flags, default=[], help="`slimrank serve` flags for A only"
    )
    parser.add_argument(
        "--b-flags", type=serve_flags, default=[], help="`slimrank serve` flags for B only"
    )
    parser.add_argument(
        "--a-env",
        type=serve_env,
        action="append",
        default=[],
        help="KEY=VALUE in A's server environment only (repeatable)",
    )
    parser.add_argument(
        "--b-env",
        type=serve_env,
        action="append",
        default=[],
        help="KEY=VALUE in B's server environment only (repeatable)",
    )
    parser.add_argument(
        "--a-front",
        type=serve_flags,
        help="serve A behind `slimrank front` with these flags (e.g. '--rate 400')",
    )
    parser.add_argument(
        "--b-front",
        type=serve_flags,
        help="serve B behind `slimrank front` with these flags (e.g. '--rate 400')",
    )
    parser.add_argument(
        "--batch-beside",
        type=int,
        default=0,
        metavar="N",
        help="a client sends RecommendBatch calls of N requests back to back meanwhile",
    )
    parser.add_argument("--name", help="results file suffix (default: LABEL-vs-LABEL-RATE)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("serve_args", nargs="*", help="more `slimrank serve` flags, after --")
    args = parser.parse_args()
    check_trees(parser, args)
    if args.rate <= 0 or args.calls < 100 or args.pairs < 1:
        parser.error("--rate must be > 0, --calls >= 100, --pairs >= 1")
    if not 0 <= args.batch_beside <= 64:
        parser.error("--batch-beside must be in [0, 64] (the server's max_batch)")
    if not (0 <= args.freeze <= 10) or not (0 <= args.freeze_at < args.calls / args.rate):
        parser.error("--freeze must be in [0, 10] s, --freeze-at within the schedule")
    for flag, pairs in (("--a-env", args.a_env), ("--b-env", args.b_env)):
        keys = [key for key, _ in pairs]
        if len(set(keys)) < len(keys):
            parser.error(f"{flag}: a key given twice ({', '.join(sorted(keys))})")
    (a, tree_a), (b, tree_b) = args.a, args.b
    requests = demo_requests_from(args.bundles)
    runs = []
    flags = {a: args.a_flags, b: args.b_flags}
    envs = {a: dict(args.a_env), b: dict(args.b_env)}
    fronts = {a: args.a_front, b: args.b_front}
    for pair in range(args.pairs):
        for label, tree in alternating(pair, args.a, args.b):
            run = one_run(
                label,
                tree,
                args.bundles,
                requests,
                args,
                pair,
                flags[label],
                envs[label],
                fronts[label],
            )
            print(json.dumps(run), flush=True)
            runs.append(run)
    report = {
        "command": "bench/serving_ab.py " + shlex.join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "variants": [a, b],
        "trees": {a: str(tree_a), b: str(tree_b)},
        "flags": flags,
        "env": envs,
        "front": fronts,
        "bundles": str(args.bundles),
        "rate": args.rate,
        "calls": args.calls,
        "freeze_s": args.freeze,
        "freeze_at_s": args.freeze_at,
        "batch_beside": args.batch_beside,
        "cpu": cpu_features(),
        "python": platform.python_version(),
        "runs": runs,
        "summary": summarize(runs, a, b),
    }
    text = markdown(report)
    print(text)
    if not args.no_save:
        name = args.name or f"{a}-vs-{b}-{args.rate:g}"
        out = ROOT / "bench" / "results" / f"serving_ab_{name}"
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)
        print(f"wrote {out}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
