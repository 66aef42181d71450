"""Probe (session 24, kept as the record of a feature not kept): does reloading the front's
nginx under load hurt callers? One `slimrank serve` behind `slimrank front --rate 600 --burst
50`, a seeded open-loop schedule of Recommend calls at RATE/s for 8 s (bench/loadgen.py, 2 s
deadlines), and nginx sent SIGHUP (a configuration reload, as `--adapt` did on each rate
change) every PERIOD seconds (0: never). Prints one JSON line: reloads sent, calls by gRPC
status code (0 OK, 4 DEADLINE_EXCEEDED, 8 RESOURCE_EXHAUSTED, 14 UNAVAILABLE), p99 of the
answered calls in ms.

    .venv/bin/python bench/results/front_reload_probe.py PERIOD RATE [BUNDLES]

Run from a checkout of slimrank after `make demo` (BUNDLES defaults to runs/demo/bundles).
"""

import json
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT / "bench"))
from loadgen import drive, job_for  # noqa: E402
from serving import ServerProcess, demo_requests_from  # noqa: E402
from serving_ab import FrontProcess  # noqa: E402

period, rate = float(sys.argv[1]), float(sys.argv[2])
bundles = Path(sys.argv[3] if len(sys.argv) > 3 else "runs/demo/bundles").resolve()
serve = [sys.executable, "-m", "slimrank.cli", "serve", "--bundles", str(bundles), "--port", "0"]
server = ServerProcess([*serve, "--metrics-port", "0"])
front = FrontProcess(ROOT, server.target, ["--rate", "600", "--burst", "50"])
stop, reloads = threading.Event(), [0]


def reload_now_and_then() -> None:
    while not stop.wait(period):
        os.kill(front.master, signal.SIGHUP)
        reloads[0] += 1


try:
    if period > 0:
        threading.Thread(target=reload_now_and_then, daemon=True).start()
    requests = demo_requests_from(bundles)
    job = job_for(front.target, "/slimrank.v1.Recommender/Recommend", requests, rate, int(8 * rate))
    out = drive(job, timeout_s=60)
    stop.set()
finally:
    front.stop()
    server.stop()
codes = out["codes"]
latency_ms = (out["done"] - out["schedule"]) * 1000
print(
    json.dumps(
        {
            "period_s": period,
            "rate": rate,
            "reloads": reloads[0],
            "calls": int(codes.size),
            "codes": {int(c): int((codes == c).sum()) for c in np.unique(codes)},
            "p99_ms": round(float(np.percentile(latency_ms[codes == 0], 99)), 2),
        }
    )
)
