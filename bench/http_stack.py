"""Which web server carries the HTTP/JSON API: aiohttp or a small asyncio server on h11.

    python bench/http_stack.py --bundles /work/main/runs/demo/bundles

Both candidates run on the gRPC server's own event loop, in front of the same
:class:`slimrank.serving.http_api.HttpApi` (same admission, handler thread, servicer), so
only the HTTP stack differs. The served bundle is ``CURRENT`` of ``--bundles`` (read only).
For each stack and rate, an open-loop load generator in its own process (Poisson arrivals,
one keep-alive ``http.client`` connection per thread, latency from the scheduled send time)
sends ``POST /v1/recommend`` for known users; gRPC through the same generator is the
reference. Two servicers: the bundle's (retrieve + features + int8 ranker) at rates it holds,
and an echo (a fixed 10-item answer, no model work) at a few hundred calls/s, which shows
the stack's own cost. Writes ``bench/results/http_stack.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
USERS = 200  # known users the calls cycle over


# -- the h11 candidate ----------------------------------------------------------------------


@dataclasses.dataclass
class H11Front:
    server: asyncio.AbstractServer
    port: int

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def start_h11(
    api: Any, host: str, port: int, reuse_port: bool = False, grace_s: float = 5.0
) -> H11Front:
    """A minimal HTTP/1.1 keep-alive server on asyncio streams with h11 parsing."""
    import h11

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=api.max_body_bytes)
        try:
            while True:
                request, body = None, bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
                if request is None:
                    return
                headers = {k.decode().lower(): v.decode() for k, v in request.headers}
                answer = await api.handle(
                    request.method.decode(),
                    request.target.decode(),
                    headers.get("content-type"),
                    bytes(body),
                )
                out = [("content-type", "application/json"), *answer.headers]
                out.append(("content-length", str(len(answer.body))))
                writer.write(conn.send(h11.Response(status_code=answer.status, headers=out)))
                writer.write(conn.send(h11.Data(data=answer.body)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(serve, host, port, reuse_port=reuse_port or None)
    return H11Front(server, int(server.sockets[0].getsockname()[1]))


# -- the servers ----------------------------------------------------------------------------


def echo_factory(holder: Any, config: Any, metrics: Any) -> Any:
    """A Recommender whose answers cost nothing: the stacks' own cost shows."""
    from slimrank.serving.proto.slimrank.v1 import recommender_pb2

    items = [recommender_pb2.ScoredItem(item_id=f"i{i}", score=1.0 / (i + 1)) for i in range(10)]

    class Echo:
        def Recommend(self, request: Any, context: Any) -> Any:
            return recommender_pb2.RecommendResponse(items=items, model_version="echo")

        Search = RecommendBatch = Recommend

    return Echo()


def start_server(bundles: Path, stack: str, echo: bool) -> tuple[Any, int, int, list[str]]:
    """Start gRPC + HTTP in this process with ``stack``; returns (server, grpc, http, users)."""
    from prometheus_client import CollectorRegistry

    import slimrank.serving.http_server as http_server
    from slimrank.serving.config import ServerConfig
    from slimrank.serving.loader import default_loaders
    from slimrank.serving.reload import load_current
    from slimrank.serving.server import create_server
    from slimrank.serving.snapshot import SnapshotHolder

    if stack == "h11":
        http_server.start_http = start_h11  # type: ignore[assignment]
    holder = SnapshotHolder(load_current(bundles, default_loaders()))
    config = ServerConfig(http_port=0, max_inflight=32, max_workers=40, max_pending_rpcs=160)
    server, port = create_server(
        config, holder, CollectorRegistry(), recommender=echo_factory if echo else None
    )
    server.mark_serving()
    users = [str(u) for u in holder.get().user_ids[:USERS]]
    return server, port, int(server.http_port), users


# -- the load generator (its own process) ---------------------------------------------------


def loadgen(job: dict[str, Any]) -> dict[str, Any]:
    """Send ``job['n']`` calls at ``job['rate']``/s; return latency percentiles in ms."""
    import http.client

    import grpc

    from slimrank.serving.proto.slimrank.v1 import recommender_pb2, recommender_pb2_grpc

    n, rate, threads = job["n"], job["rate"], job["threads"]
    gaps = np.random.default_rng(0).exponential(1.0 / rate, size=n)
    schedule = np.cumsum(gaps) - gaps[0]
    bodies = [json.dumps({"user_id": u, "k": 10}).encode() for u in job["users"]]
    latency, status = np.full(n, np.nan), np.zeros(n, dtype=np.int32)
    lag = np.zeros(n)
    counter, lock = iter(range(n)), threading.Lock()
    t0 = time.perf_counter() + 0.2

    def worker() -> None:
        if job["kind"] == "grpc":
            stub = recommender_pb2_grpc.RecommenderStub(
                grpc.insecure_channel(f"127.0.0.1:{job['port']}")
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", job["port"], timeout=10)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            due = t0 + schedule[i]
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            lag[i] = time.perf_counter() - due
            user = job["users"][i % len(job["users"])]
            if job["kind"] == "grpc":
                try:
                    stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=10), timeout=5)
                    status[i] = 200
                except grpc.RpcError as error:
                    status[i] = 1000 + error.code().value[0]
            else:
                conn.request(
                    "POST",
                    "/v1/recommend",
                    bodies[i % len(bodies)],
                    {"Content-Type": "application/json"},
                )
                response = conn.getresponse()
                response.read()
                status[i] = response.status
            latency[i] = time.perf_counter() - due

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    cpu0 = time.process_time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    ok = status == 200
    ms = latency[ok] * 1000
    return {
        "sent": n,
        "ok": int(ok.sum()),
        "p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
        "p99_ms": float(np.percentile(ms, 99)) if ms.size else None,
        "max_ms": float(ms.max()) if ms.size else None,
        "send_lag_p99_ms": float(np.percentile(lag, 99) * 1000),
        "loadgen_cpu_ms_per_call": 1000 * (time.process_time() - cpu0) / n,
    }


def run_load(kind: str, port: int, rate: float, seconds: float, users: list[str]) -> dict:
    job = {
        "kind": kind,
        "port": port,
        "rate": rate,
        "n": int(rate * seconds),
        "threads": 16,
        "users": users,
    }
    out = subprocess.run(
        [sys.executable, __file__, "--loadgen", json.dumps(job)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_cpu_ms(before: float, calls: int) -> float:
    return 1000 * (time.process_time() - before) / calls


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=Path, default=Path("runs/demo/bundles"))
    p.add_argument("--seconds", type=float, default=10.0, help="per rate (default 10)")
    p.add_argument("--model-rates", default="50,100", help="calls/s with the bundle's ranker")
    p.add_argument("--echo-rates", default="200,400", help="calls/s with the echo servicer")
    p.add_argument("--repeat", type=int, default=3, help="rounds, stack order alternating (3)")
    p.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loadgen:
        print(json.dumps(loadgen(json.loads(args.loadgen))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serving import cpu_features

    load_before = os.getloadavg()
    rows = []
    for round_ in range(args.repeat):
        # Alternate which stack goes first, so a drift in the machine's load favours neither.
        stacks = ("aiohttp", "h11") if round_ % 2 == 0 else ("h11", "aiohttp")
        for echo, rates in ((False, args.model_rates), (True, args.echo_rates)):
            for stack in stacks:
                server, grpc_port, http_port, users = start_server(args.bundles, stack, echo)
                kinds = [("http", http_port)]
                kinds += [("grpc", grpc_port)] if stack == "aiohttp" else []
                for kind, port in kinds:
                    for rate in (float(r) for r in rates.split(",")):
                        cpu = time.process_time()
                        result = run_load(kind, port, rate, args.seconds, users)
                        result["server_cpu_ms_per_call"] = server_cpu_ms(cpu, result["sent"])
                        rows.append(
                            {
                                "round": round_,
                                "servicer": "echo" if echo else "ml-100k bundle",
                                "stack": stack if kind == "http" else "gRPC (reference)",
                                "rate": rate,
                                **result,
                            }
                        )
                        print(json.dumps(rows[-1]), flush=True)
                server.shutdown(0).wait(10)
    import aiohttp
    import grpc
    import h11

    meta = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "h11": h11.__version__,
        "grpcio": grpc.__version__,
        "cpu": cpu_features(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "seconds_per_rate": args.seconds,
        "rounds": args.repeat,
        "bundle": str(args.bundles),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "http_stack.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_markdown(meta, rows)


def write_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    cpu = meta["cpu"]
    lines = [
        "# HTTP/JSON stack: aiohttp vs asyncio + h11 (open loop, `POST /v1/recommend`)",
        "",
        f"{meta['when']} · {cpu['model']}, {cpu['cpus']} cpus · flags {' '.join(cpu['flags'])}"
        f" · Python {meta['python']}, aiohttp {meta['aiohttp']}, h11 {meta['h11']}, grpcio"
        f" {meta['grpcio']} · load average before/after {meta['load_before']} /"
        f" {meta['load_after']}",
        "",
        "Command: `make bench-http` (`python bench/http_stack.py --bundles runs/demo/bundles`,"
        " the ml-100k bundle of"
        f" `make demo`). {meta['seconds_per_rate']:.0f} s per rate and {meta['rounds']} rounds"
        " (the stack that goes first alternates), Poisson arrivals, 16 keep-alive connections"
        " from a load generator in its own process; latency from the scheduled send time, in"
        " ms. Server CPU is the whole server process (gRPC loop, HTTP stack, handler thread)"
        " per call. The machine is shared (2 cores): single rounds are noisy, so the first"
        " table gives the median over the rounds.",
        "",
        "## Median over rounds",
        "",
        "| servicer | stack | calls/s | ok / sent | p50 ms | p99 ms | server CPU ms/call |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["servicer"], r["stack"], r["rate"]), []).append(r)

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    def med(runs: list[dict[str, Any]], key: str) -> float | None:
        values = [run[key] for run in runs if run[key] is not None]
        return float(np.median(values)) if values else None

    for (servicer, stack, rate), runs in cells.items():
        ok, sent = sum(r["ok"] for r in runs), sum(r["sent"] for r in runs)
        lines.append(
            f"| {servicer} | {stack} | {rate:.0f} | {ok}/{sent} | {f(med(runs, 'p50_ms'))} |"
            f" {f(med(runs, 'p99_ms'))} | {f(med(runs, 'server_cpu_ms_per_call'))} |"
        )
    lines += [
        "",
        "## Every run",
        "",
        "| round | servicer | stack | calls/s | ok / sent | p50 ms | p99 ms | max ms |"
        " server CPU ms/call | generator send lag p99 ms |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['servicer']} | {r['stack']} | {r['rate']:.0f} |"
            f" {r['ok']}/{r['sent']} | {f(r['p50_ms'])} | {f(r['p99_ms'])} | {f(r['max_ms'])} |"
            f" {f(r['server_cpu_ms_per_call'])} | {f(r['send_lag_p99_ms'])} |"
        )
    lines.append("")
    (RESULTS / "http_stack.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
