"""Prototype (session 23, not part of slimrank): `slimrank serve` (one process) behind nginx
(grpc_pass), whose limiter answers RESOURCE_EXHAUSTED itself, without reaching the server:
either an in-flight cap (limit_conn counts each HTTP/2 stream) or a request rate (limit_req,
nodelay burst). Alternates runs with and without nginx on the same seeded schedule
(bench/loadgen.py) and prints one JSON line per run.

    apt-get install nginx-light   # Debian's nginx 1.22, with the HTTP/2 module
    BUNDLES=runs/demo/bundles .venv/bin/python bench/results/nginx_front_prototype.py \
        RATE CALLS LIMIT PAIRS

LIMIT: N (at most N calls in flight) or rR,B (R calls/s, a burst of B). Run from a checkout
of slimrank after `make demo`.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from loadgen import drive, job_for  # noqa: E402
from serving import ServerProcess, _cpu_seconds, demo_requests_from  # noqa: E402

B = Path(os.environ.get("BUNDLES", "runs/demo/bundles")).resolve()
D = Path(tempfile.mkdtemp(prefix="nginx-front-"))
RATE, CALLS, LIMIT = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
PAIRS = int(sys.argv[4]) if len(sys.argv) > 4 else 2

CONF = """worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
daemon off;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  limit_conn_zone $server_name zone=calls:1m;
  limit_req_zone $server_name zone=rate:1m rate={rate}r/s;
  upstream slimrank {{ server {up}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{front} http2;
    server_name slimrank;
    http2_max_concurrent_streams 1024;
    location / {{
      {limiter}
      limit_conn_status 429;
      limit_req_status 429;
      limit_req_log_level info;
      limit_conn_log_level info;
      error_page 429 = @overloaded;
      grpc_pass grpc://slimrank;
    }}
    location @overloaded {{
      default_type application/grpc;
      add_header grpc-status 8 always;
      add_header grpc-message "overloaded" always;
      return 200;
    }}
  }}
}}
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def run(front_nginx: bool, seed: int, requests):
    argv = [
        sys.executable,
        "-m",
        "slimrank.cli",
        "serve",
        "--bundles",
        str(B),
        "--port",
        "0",
        "--metrics-port",
        "0",
    ]
    server = ServerProcess(argv, code=ROOT)
    ng = None
    try:
        target = server.target
        pids = list(server.pids)
        if front_nginx:
            front = free_port()
            (D / "tmp").mkdir(exist_ok=True)
            (D / "nginx.conf").write_text(
                CONF.format(
                    d=D,
                    up=server.target,
                    front=front,
                    rate=LIMIT.split(",")[0][1:] if LIMIT.startswith("r") else 1000,
                    limiter=(
                        f"limit_req zone=rate burst={LIMIT.split(',')[1]} nodelay;"
                        if LIMIT.startswith("r")
                        else f"limit_conn calls {LIMIT};"
                    ),
                )
            )
            ng = subprocess.Popen(["nginx", "-c", str(D / "nginx.conf")])
            time.sleep(0.5)
            pids.append(ng.pid)
            target = f"127.0.0.1:{front}"
            # nginx worker pid(s)
            out = subprocess.run(
                ["pgrep", "-P", str(ng.pid)], capture_output=True, text=True
            ).stdout.split()
            pids += [int(p) for p in out]
        cpu0 = _cpu_seconds(pids)
        job = job_for(
            target, "/slimrank.v1.Recommender/Recommend", requests, RATE, CALLS, seed=seed
        )
        out = drive(job, timeout_s=CALLS / RATE + 120)
        cpu = _cpu_seconds(pids) - cpu0
    finally:
        if ng is not None:
            ng.terminate()
            ng.wait(10)
        server.stop()
    codes = out["codes"]
    lat = (out["done"] - out["schedule"]) * 1000
    ok = lat[codes == 0]
    ref = lat[codes == 8]

    def pct(a, q):
        return round(float(np.percentile(a, q)), 2) if a.size else None

    return {
        "nginx": front_nginx,
        "seed": seed,
        "answered": int(ok.size),
        "refused": int(ref.size),
        "other": int(((codes != 0) & (codes != 8)).sum()),
        "other_codes": sorted(set(codes[(codes != 0) & (codes != 8)].tolist())),
        "p50": pct(ok, 50),
        "p99": pct(ok, 99),
        "ref_p50": pct(ref, 50),
        "ref_p99": pct(ref, 99),
        "cpu_ms_per_call": round(1000 * cpu / CALLS, 3),
        "load": round(os.getloadavg()[0], 2),
    }


requests = demo_requests_from(B)
for pair in range(PAIRS):
    order = [False, True] if pair % 2 == 0 else [True, False]
    for fn in order:
        print(json.dumps(run(fn, pair, requests)), flush=True)
