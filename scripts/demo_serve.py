"""The end of ``make demo``: serve the published bundle, query a few users, time Recommend.

Starts ``slimrank serve --bundles DIR --port 0 --metrics-port 0 --http-port 0`` as a subprocess,
waits for its ready line and for health SERVING, prints the recommendations of a few known
users (the first also over HTTP/JSON, checked equal to gRPC) and of
a new user known only by recent items (with titles when the bundle is MovieLens-100k), runs
sequential Recommend calls for a latency summary, then sends SIGTERM and checks that the
server exits 0. Exits non-zero (with the server's log tail) if any of that fails.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

import numpy as np
from rich.console import Console
from rich.table import Table

from slimrank.bundle import current_version
from slimrank.bundle.formats import read_npy
from slimrank.serving.client import SlimrankClient
from slimrank.serving.query import bundle_titles, print_recommendations, recommendation_table

READY_PREFIX = "serving on "
WARM_UP_CALLS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=Path, required=True, help="bundles directory (CURRENT)")
    p.add_argument("--users", type=int, default=3, help="known users to show (default 3)")
    p.add_argument("-k", type=int, default=10, help="items per user (default 10)")
    p.add_argument("--requests", type=int, default=200, help="timed Recommend calls (200)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to get ready")
    return p.parse_args(argv)


def start_server(bundles: Path, log_path: Path) -> tuple[subprocess.Popen[str], queue.Queue]:
    """Start ``slimrank serve`` on free ports; its stdout lines arrive on the queue."""
    command = [sys.executable, "-m", "slimrank.cli", "serve", "--bundles", str(bundles)]
    command += ["--port", "0", "--metrics-port", "0", "--http-port", "0"]
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log_file, text=True, env=os.environ.copy()
    )
    log_file.close()  # the child holds its own descriptor
    lines: queue.Queue = queue.Queue()

    def pump(stdout: IO[str]) -> None:
        for line in stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)  # end of output: the server exited

    threading.Thread(target=pump, args=(proc.stdout,), daemon=True).start()
    return proc, lines


def wait_ready(proc: subprocess.Popen[str], lines: queue.Queue, timeout: float) -> tuple[str, str]:
    """Return the gRPC and the HTTP ``host:port`` from the server's ready line; raises if it
    exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no ready line from the server within {timeout:.0f} s")
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError(f"the server exited with {proc.wait()} before it was ready")
        if line.startswith(READY_PREFIX):
            words = line.removeprefix(READY_PREFIX).split()
            return words[0], words[words.index("http") + 1]


def wait_serving(client: SlimrankClient, timeout: float) -> None:
    """Poll health until SERVING."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = client.health()
        if status == "SERVING":
            return
        time.sleep(0.1)
    raise TimeoutError(f"health is {status}, not SERVING, after {timeout:.0f} s")


def latency_table(seconds: np.ndarray) -> Table:
    """Return a one-row table of call latencies in milliseconds."""
    ms = seconds * 1000.0
    table = Table(title=f"{len(ms)} sequential Recommend calls (client-side, ms)")
    for name in ("p50", "p95", "p99", "max", "mean", "calls/s"):
        table.add_column(name, justify="right")
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    table.add_row(
        f"{p50:.2f}",
        f"{p95:.2f}",
        f"{p99:.2f}",
        f"{ms.max():.2f}",
        f"{ms.mean():.2f}",
        f"{len(ms) / seconds.sum():.0f}",
    )
    return table


def http_recommend(http: str, user: str, k: int) -> tuple[str, list[str]]:
    """POST /v1/recommend as a frontend without gRPC would; return the curl line and items."""
    body = json.dumps({"user_id": user, "k": k})
    request = urllib.request.Request(
        f"http://{http}/v1/recommend",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    curl = f"curl -s http://{http}/v1/recommend -H 'Content-Type: application/json' -d '{body}'"
    return curl, [item["item_id"] for item in answer["items"]]


def demo(args: argparse.Namespace, client: SlimrankClient, console: Console, http: str) -> None:
    """Query a few users (one over HTTP/JSON too), then time ``args.requests`` Recommend calls."""
    version = current_version(args.bundles)
    if version is None:
        raise RuntimeError(f"{args.bundles}: nothing published (no CURRENT)")
    users = [str(u) for u in read_npy(args.bundles / version / "users.npy")]
    items = [str(i) for i in read_npy(args.bundles / version / "items.npy")]
    popularity = read_npy(args.bundles / version / "popularity.npy")
    titles = bundle_titles(args.bundles, version)
    rng = np.random.default_rng(0)
    shown = [users[i] for i in sorted(rng.choice(len(users), args.users, replace=False))]
    for user in shown:
        print_recommendations(console, user, client.recommend(user, args.k), titles)
    curl, over_http = http_recommend(http, shown[0], args.k)
    over_grpc = list(client.recommend(shown[0], args.k).item_ids)
    if over_http != over_grpc:
        raise RuntimeError(f"HTTP answered {over_http}, gRPC {over_grpc} for user {shown[0]}")
    console.print(f"HTTP/JSON: {curl}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"answers the same {len(over_http)} items as gRPC for user {shown[0]}")
    # A new user who just watched three of the most popular items.
    recent = [items[i] for i in np.argsort(-popularity, kind="stable")[:3]]
    ranked = client.recommend("new-user", args.k, recent=recent)
    named = ", ".join(titles.get(i, i) if titles else i for i in recent)
    console.print(f"new user, recent items: {named}", markup=False, highlight=False)
    print_recommendations(console, "new-user", ranked, titles)
    # What a search box sends: words, a typo, for the first shown user and for nobody.
    if (args.bundles / version / "catalog").is_dir():
        for text, user in (("star wars", shown[0]), ("godfater", ""), ("comedy", shown[0])):
            found = client.search_text(text, 5, user_id=user)
            who = f"user {user}" if user else "no user"
            console.print(f"search {text!r} for {who}:", markup=False, highlight=False)
            console.print(recommendation_table(found, titles))

    for user in users[:WARM_UP_CALLS]:  # untimed: first calls pay for lazy initialization
        client.recommend(user, args.k)
    seconds = np.empty(args.requests)
    for n in range(args.requests):
        user = users[n % len(users)]
        start = time.perf_counter()
        client.recommend(user, args.k)
        seconds[n] = time.perf_counter() - start
    console.print(latency_table(seconds))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    errors = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
    with tempfile.TemporaryDirectory(prefix="slimrank-demo-") as tmp:
        log_path = Path(tmp) / "serve.log"
        proc, lines = start_server(args.bundles, log_path)
        try:
            target, http = wait_ready(proc, lines, args.startup_timeout)
            console.print(f"server ready on {target}, HTTP/JSON on {http} (pid {proc.pid})")
            with SlimrankClient(target, timeout=10.0) as client:
                wait_serving(client, args.startup_timeout)
                demo(args, client, console, http)
        except Exception as error:  # any failure: show why, with the server's own log
            errors.print(f"demo failed: {type(error).__name__}: {error}")
            errors.print("server log (end):\n" + log_path.read_text()[-4000:])
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            return 1
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            errors.print("the server did not stop within 60 s of SIGTERM; killed it")
            return 1
    if code != 0:
        errors.print(f"the server exited {code} after SIGTERM (expected 0)")
        return 1
    console.print("SIGTERM: the server drained and exited 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
