"""Start-up, memory and reloads under load, through ``slimrank serve`` on a bundles root.

    .venv/bin/python bench/serving_reload.py                      # runs/demo/bundles
    .venv/bin/python bench/serving_reload.py --bundles ROOT --rate 100 --duration 60

The reload goes from the root's CURRENT to another version (``--to``), or, by default, to a
copy of CURRENT under the next version name (the same files hard-linked, its manifest naming
the new version): the server loads it as it would load a new model of the same size.
Everything happens in a scratch root under ``bench/.cache/reload`` of hard links (the user's
root and its HISTORY are never touched):

1. launches ``slimrank serve --bundles SCRATCH --port 0`` (the CLI with its defaults, CURRENT
   polled every ``--poll-interval`` s) and times start-up, from launch to the ready line (the
   bundle verified, loaded and warmed up, health SERVING);
2. offers ``--rate`` Recommend calls/s for known users, open loop (``bench/loadgen.py``), for
   ``--duration`` s; a third of the way in it promotes the other version, two thirds of the way
   in the original one back: two reloads, under load, as an operator's ``nice slimrank
   bundle promote`` makes them (the promote hashes the whole bundle, 10 nice steps below the
   server);
3. times each reload from the moved CURRENT to the first answer that names the new version, and
   counts every call that was not answered OK, with the latency of the calls sent during each
   reload beside the rest.

RSS is the server's VmRSS once it is ready and after the run, and its peak (VmHWM), which
includes the moment two snapshots are held during a reload. Writes
``bench/results/serving_reload_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from loadgen import drive, job_for  # noqa: E402

# Read from the server's /metrics after the load: refusals it counted and stalls it noticed.
SERVER_COUNTERS = ("slimrank_shed_requests_total", "slimrank_stalls_total")
from serving import (  # noqa: E402
    RECOMMEND,
    RESULTS,
    ServerProcess,
    checkout,
    cpu_features,
    demo_requests_from,
    imported_tree,
    status_kib,
)

log = logging.getLogger("bench.serving_reload")

SCRATCH = HERE / ".cache" / "reload"
RELOAD_TIMEOUT_S = 600.0
LOADGEN_START_S = 3.0  # the load generator's start-up and warm-up calls
PROMOTE_NICE = 10


def scratch_root(root: Path, current: str, other: str | None) -> tuple[Path, str]:
    """A bundles root of hard links to ``current`` (its CURRENT) and ``other`` of ``root``, or
    with ``other`` None to ``current`` twice, the copy under the next version name; return it
    and the version to reload to."""
    from slimrank.bundle import store
    from slimrank.bundle.versions import format_version, version_key

    scratch = SCRATCH / root.resolve().as_posix().strip("/").replace("/", "_")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shutil.copytree(root / current, scratch / current, copy_function=os.link)
    if other is not None:
        shutil.copytree(root / other, scratch / other, copy_function=os.link)
    else:
        other = format_version(version_key(current) + 1, datetime.now(UTC))
        shutil.copytree(root / current, scratch / other, copy_function=os.link)
        manifest = scratch / other / "manifest.json"
        data = json.loads(manifest.read_text())
        manifest.unlink()  # a new file: the link shares current's
        manifest.write_text(json.dumps({**data, "version": other}, indent=1))
    store.promote(scratch, current)  # verifies every file, as the server will
    return scratch, other


def check_loads(root: Path, version: str) -> None:
    """Fail now, not mid-run, when the server's loader would refuse ``version``."""
    from slimrank.bundle import open_bundle
    from slimrank.errors import SlimrankError
    from slimrank.serving.loader import load_snapshot

    try:
        load_snapshot(open_bundle(root, version))
    except SlimrankError as err:
        raise SystemExit(
            f"{root}: the server would refuse {version}, so it cannot be reloaded to: {err} "
            "(pass --to a version this code serves, or leave --to out to reload a copy of "
            "CURRENT)"
        ) from err


def served_version(target: str, request: bytes) -> str | None:
    """The model version a Recommend answer names (None if the call failed)."""
    import grpc

    from slimrank.serving.proto.slimrank.v1 import recommender_pb2

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(RECOMMEND)
        try:
            raw = call(request, timeout=5)
        except grpc.RpcError as err:
            log.error("Recommend failed: %s %s", err.code(), err.details())
            return None
    return recommender_pb2.RecommendResponse.FromString(raw).model_version


def wait_for_version(target: str, request: bytes, version: str, since: float) -> tuple[float, int]:
    """Seconds from ``since`` until answers name ``version``, and how many of the polls (one
    Recommend every 50 ms, beside the load) failed meanwhile."""
    deadline = since + RELOAD_TIMEOUT_S
    failed = 0
    while time.perf_counter() < deadline:
        served = served_version(target, request)
        if served == version:
            return time.perf_counter() - since, failed
        failed += served is None
        time.sleep(0.05)
    raise SystemExit(f"the server did not serve {version} within {RELOAD_TIMEOUT_S:.0f} s")


def summarize(out: dict[str, Any], reloads: list[dict[str, Any]]) -> dict[str, Any]:
    """Codes and latency of the whole run, and of the calls sent during each reload."""
    import grpc

    schedule, done, codes = out["schedule"], out["done"], out["codes"]
    latency = (done - schedule) * 1000
    ok = codes == 0
    names = {code.value[0]: code.name for code in grpc.StatusCode}
    bad = {names.get(int(c), str(c)): int((codes == c).sum()) for c in np.unique(codes[~ok])}

    def pct(mask: np.ndarray) -> dict[str, float]:
        lat = latency[mask & ok]
        if not lat.size:
            return {
                "calls": int(mask.sum()),
                "not_ok": int((mask & ~ok).sum()),
                "p50_ms": float("nan"),
                "p99_ms": float("nan"),
            }
        return {
            "calls": int(mask.sum()),
            "not_ok": int((mask & ~ok).sum()),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "max_ms": round(float(lat.max()), 2),
        }

    start = float(out["meta"]["start"])
    during = np.zeros(len(codes), dtype=bool)
    for reload in reloads:
        begin = reload["promoted_at"] - start
        reload["begin_s"] = round(begin, 2)  # since the first scheduled call
        window = (schedule >= begin) & (schedule <= begin + reload["seconds"])
        reload["calls"] = pct(window)
        during |= window
    return {
        "sent": len(codes),
        "ok": int(ok.sum()),
        "not_ok": bad,
        "all": pct(np.ones(len(codes), dtype=bool)),
        "during_reloads": pct(during),
        "outside_reloads": pct(~during),
        # When each call that was not OK was scheduled (s since the first), to place them
        # against the reloads' begin_s.
        "not_ok_at_s": [round(float(t), 2) for t in schedule[~ok]],
    }


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        f"# Start-up, memory and reloads under load: `{report['bundles']}`",
        "",
        f"{report['date']} · {report['machine']} · {report['cpu']['model']} · flags "
        f"{' '.join(report['cpu']['flags']) or '-'} · load average before/after "
        f"{report['loadavg_before']} / {report['loadavg_after']}",
        "",
        f"`slimrank serve --bundles <scratch root> --port 0 --metrics-port 0 --poll-interval "
        f"{report['poll_interval_s']:g}{''.join(' ' + a for a in report.get('serve_args', []))}` "
        "(one process, defaults otherwise); "
        f"{report['rate']:g} Recommend calls/s for known users, open loop, "
        f"{report['duration_s']:g} s; versions `{report['versions'][0]}` (CURRENT) and "
        f"`{report['versions'][1]}`, {report['bundle_mib']:.0f} MiB each. Each reload is "
        f"set off by a promote (which hashes the bundle) run {PROMOTE_NICE} nice steps below "
        "the server.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| start-up (launch to ready: verify, load, warm up) | {report['startup_s']:.1f} s |",
        f"| RSS when ready | {report['rss_ready_mib']:.0f} MiB |",
        f"| RSS after the run | {report['rss_after_mib']:.0f} MiB |",
        f"| peak RSS (VmHWM) | {report['rss_peak_mib']:.0f} MiB |",
    ]
    for i, r in enumerate(report["reloads"], 1):
        c = r["calls"]
        lines.append(
            f"| reload {i} to `{r['version']}`: CURRENT moved to first answer "
            f"| {r['seconds']:.2f} s |"
        )
        lines.append(
            f"| calls sent during reload {i}: p50 / p99 | {c['p50_ms']:.2f} / {c['p99_ms']:.2f} ms"
            f" ({c['calls']} calls, {c['not_ok']} not OK; {r['polls_failed']} version polls "
            "failed) |"
        )
    o, a = s["outside_reloads"], s["all"]
    lines += [
        f"| calls outside the reloads: p50 / p99 | {o['p50_ms']:.2f} / {o['p99_ms']:.2f} ms |",
        f"| all calls: p50 / p99 / max | {a['p50_ms']:.2f} / {a['p99_ms']:.2f} / "
        f"{a.get('max_ms', float('nan')):.1f} ms |",
        f"| sent / OK | {s['sent']} / {s['ok']} |",
        f"| not OK | {', '.join(f'{k} {v}' for k, v in s['not_ok'].items()) or 'none'} |",
    ]
    counted = report.get("server_counters", {})
    lines += [f"| server's `{name}` | {value:g} |" for name, value in counted.items()]
    by_reason = report.get("shed_by_reason", {})
    if by_reason:
        shown = ", ".join(f"{reason} {value:g}" for reason, value in sorted(by_reason.items()))
        lines.append(f"| of which by reason | {shown} |")
    # The server's counts include the warm-up calls the load generator sends before the
    # schedule (not in "sent"); a cold server may refuse some of those bursts.
    warmup = report.get("warmup_errors", {})
    lines.append(
        "| the load generator's warm-up calls (before the schedule, in the server's counts) "
        f"that failed | {', '.join(f'{k} {v}' for k, v in warmup.items()) or 'none'} |"
    )
    lines += [
        "",
        f"Command: `{report['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, default=ROOT / "runs" / "demo" / "bundles")
    parser.add_argument("--to", help="the version to reload to (default: a copy of CURRENT)")
    parser.add_argument("--rate", type=float, default=100.0, help="Recommend calls/s")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="of CURRENT, in s")
    parser.add_argument(
        "--reloads",
        type=int,
        choices=(0, 1, 2),
        default=2,
        help="reloads during the run (0: a control run under the same load, none)",
    )
    parser.add_argument("--name", help="results file suffix (default: the bundles dir's name)")
    parser.add_argument("serve_args", nargs="*", help="more `slimrank serve` flags, after --")
    parser.add_argument(
        "--code",
        type=checkout,
        default=ROOT,
        help="serve the slimrank of this checkout (a git worktree of another commit; "
        "default: this one)",
    )
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    if imported_tree(args.code) != args.code:
        parser.error(f"--code {args.code}: a server started there imports another slimrank")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from slimrank.bundle import store
    from slimrank.serving.reload import run_deprioritized

    root = args.bundles
    current = store.current_version(root)
    if current is None:
        raise SystemExit(f"{root}: no CURRENT; publish a bundle first (make demo)")
    other = None
    if args.to:
        other = store.resolve_version(root, args.to)
        if other == current:
            raise SystemExit(f"--to {args.to}: that is CURRENT; leave --to out to reload a copy")
        check_loads(root, other)
    scratch, other = scratch_root(root, current, other)
    bundle_mib = sum(f.stat().st_size for f in (scratch / current).rglob("*") if f.is_file())
    requests = demo_requests_from(scratch)
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    # python -m, not the console script: -m imports the slimrank of the working directory
    # (--code), the console script the installed one.
    argv = [sys.executable, "-m", "slimrank.cli", "serve", "--bundles", str(scratch)]
    argv += ["--port", "0", "--metrics-port", "0"]
    argv += ["--poll-interval", str(args.poll_interval), *args.serve_args]
    launched = time.perf_counter()
    server = ServerProcess(argv, timeout_s=RELOAD_TIMEOUT_S, code=args.code)
    startup_s = time.perf_counter() - launched
    pid = server.pids[0]
    try:
        rss_ready = status_kib(pid, "VmRSS") / 1024
        log.info(
            "ready in %.1f s, RSS %.0f MiB; %g calls/s for %g s",
            startup_s,
            rss_ready,
            args.rate,
            args.duration,
        )
        n = int(args.rate * args.duration)
        job = job_for(server.target, RECOMMEND, requests, args.rate, n)
        result: dict[str, Any] = {}
        load = threading.Thread(target=lambda: result.update(drive(job, args.duration + 600)))
        load.start()
        begun = time.perf_counter() + LOADGEN_START_S  # about when the first call goes out
        reloads = []
        for version, at in ((other, 1 / 3), (current, 2 / 3))[: args.reloads]:
            time.sleep(max(0.0, begun + at * args.duration - time.perf_counter()))
            # Verifies the version (hashes every file), then moves CURRENT: an operator's
            # promote on the serving host, run below the server's priority as one should
            # (`nice slimrank bundle promote`), so that its hashing does not take the cores
            # from the server and the clients (at the same priority it did, and calls were
            # refused before the server had even seen the new CURRENT).
            run_deprioritized(lambda v=version: store.promote(scratch, v), PROMOTE_NICE)
            promoted_at = time.perf_counter()
            seconds, poll_failed = wait_for_version(
                server.target, requests[0], version, promoted_at
            )
            log.info("reloaded to %s in %.2f s (%d polls failed)", version, seconds, poll_failed)
            reloads.append(
                {
                    "version": version,
                    "promoted_at": promoted_at,
                    "seconds": seconds,
                    "polls_failed": poll_failed,
                }
            )
        load.join()
        counted = server.counters(*SERVER_COUNTERS)
        shed_by = server.counter_by("slimrank_shed_requests_total", "reason")
        rss_after = status_kib(pid, "VmRSS") / 1024
        rss_peak = status_kib(pid, "VmHWM") / 1024
    finally:
        server.stop()
    summary = summarize(result, reloads)
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "cpu": cpu_features(),
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "bundles": str(root),
        "versions": [current, other],
        "bundle_mib": bundle_mib / 2**20,
        "rate": args.rate,
        "duration_s": args.duration,
        "poll_interval_s": args.poll_interval,
        "serve_args": args.serve_args,
        "startup_s": round(startup_s, 2),
        "rss_ready_mib": round(rss_ready, 1),
        "rss_after_mib": round(rss_after, 1),
        "rss_peak_mib": round(rss_peak, 1),
        "reloads": [{k: v for k, v in r.items() if k != "promoted_at"} for r in reloads],
        "summary": summary,
        "server_counters": counted,
        "shed_by_reason": shed_by,
        "warmup_errors": result["meta"].get("warmup_errors", {}),
        "command": "bench/serving_reload.py " + shlex.join(sys.argv[1:]),
        "code": str(args.code),
    }
    text = markdown(report)
    print(text)
    if not args.no_save:
        resolved = root.resolve()  # runs/demo/bundles -> demo
        name = args.name or (resolved.parent.name if resolved.name == "bundles" else resolved.name)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"serving_reload_{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (RESULTS / f"serving_reload_{name}.md").write_text(text)
        log.info("wrote serving_reload_%s.{json,md} in %s", name, RESULTS)
    shutil.rmtree(scratch, ignore_errors=True)
    failed = summary["sent"] - summary["ok"] + sum(r["polls_failed"] for r in reloads)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
