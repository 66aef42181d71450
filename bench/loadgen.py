"""An open-loop gRPC load generator, run by ``bench/serving.py`` as its own process.

    python bench/loadgen.py JOB.json OUT.npz

Send times are Poisson arrivals at ``rate``/s drawn in advance and kept whatever the answers
do; latency is measured from the scheduled send time, so a slow server (or a late sender)
shows up as latency. Requests are serialized once, up front, and sent as bytes (no protobuf
work per call). The calls go round-robin over ``channels`` separate connections, so that
``--workers N`` servers (``SO_REUSEPORT``: the kernel hands each connection to one process)
get a share each; with ``balance_dir`` (the servers' Prometheus multiprocess directory) the
generator probes which process each connection reached and keeps as many per process.

Two clients: ``aio`` (one grpc.aio event loop thread sends and receives; the default, it costs
the least CPU per call) and ``sync`` (grpc futures from a sending thread, answers on grpc's
callback thread). The generator records its own CPU time, and how late each send was against
the schedule (its send lag): when the lag grows, the generator, not the server, is the limit.

With ``freeze`` in the job (``{"pids": [...], "at_s": t, "for_s": g}``), the aio client stops
those processes with SIGSTOP at offset ``t`` of the schedule and lets them run again (SIGCONT)
``g`` seconds later: a freeze of the server, as this 2-core VM gives it at times, at a known
moment of a seeded run (``bench/serving_ab.py --freeze``).

Before the schedule, ``warmup`` calls open and warm every connection; they are not timed, and
the ones that fail (a cold server may refuse some of these bursts) are counted by status in
``meta["warmup_errors"]``, since a server's own refusal counter includes them.

Writes ``OUT.npz`` with per-call arrays (scheduled and sent offsets, completion offsets in
seconds from the start, status code numbers) and a JSON string ``meta``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
LOCAL_POOL = ("grpc.use_local_subchannel_pool", 1)  # one connection per channel object


def schedule_of(rate: float, n: int, seed: int) -> np.ndarray:
    """Poisson send offsets in seconds: ``(n,)``, the first at 0."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps) - gaps[0]


def pids_answering(balance_dir: Path) -> dict[int, float]:
    """Health checks answered so far per server process, from its multiprocess metric file."""
    from prometheus_client.multiprocess import MultiProcessCollector

    out: dict[int, float] = {}
    for path in balance_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        total = 0.0
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                if (
                    sample.name == "slimrank_grpc_requests_total"
                    and sample.labels.get("method") == HEALTH_CHECK
                ):
                    total += sample.value
        out[pid] = total
    return out


def health_request() -> bytes:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckRequest().SerializeToString()


async def _aio_channels(job: dict[str, Any]) -> tuple[list[grpc.aio.Channel], dict[str, int]]:
    """Open the channels; with ``balance_dir`` keep an equal number per server process."""
    target, wanted = job["target"], int(job["channels"])
    balance_dir = job.get("balance_dir")
    if not balance_dir:
        channels = [grpc.aio.insecure_channel(target, options=[LOCAL_POOL]) for _ in range(wanted)]
        return channels, {}
    probe = health_request()
    by_pid: dict[int, list[grpc.aio.Channel]] = {}
    spare: list[grpc.aio.Channel] = []
    n_workers = int(job["workers"])
    per = max(1, wanted // n_workers)
    for _ in range(wanted * 8):
        channel = grpc.aio.insecure_channel(target, options=[LOCAL_POOL])
        before = pids_answering(Path(balance_dir))
        await channel.unary_unary(HEALTH_CHECK)(probe, timeout=10)
        after = pids_answering(Path(balance_dir))
        moved = [pid for pid, v in after.items() if v > before.get(pid, 0)]
        if len(moved) != 1 or len(by_pid.setdefault(moved[0], [])) >= per:
            spare.append(channel)
        else:
            by_pid[moved[0]].append(channel)
        if len(by_pid) == n_workers and all(len(c) >= per for c in by_pid.values()):
            break
    for channel in spare:
        await channel.close()
    channels = [c for group in zip(*by_pid.values(), strict=False) for c in group]
    return channels, {str(pid): len(c) for pid, c in by_pid.items()}


async def run_aio(job: dict[str, Any], requests: list[bytes], schedule: np.ndarray) -> dict:
    channels, balance = await _aio_channels(job)
    calls = [channel.unary_unary(job["method"]) for channel in channels]
    n_channels, n_requests = len(calls), len(requests)
    timeout = float(job["timeout_s"])
    warmup_errors: collections.Counter[str] = collections.Counter()
    for first in range(0, job["warmup"], n_channels):  # warm every connection, a few at a time
        answers = await asyncio.gather(
            *(
                calls[i % n_channels](requests[i % n_requests], timeout=10)
                for i in range(first, first + n_channels)
            ),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, grpc.aio.AioRpcError):
                warmup_errors[answer.code().name] += 1
            elif isinstance(answer, BaseException):
                raise answer
    n = len(schedule)
    sent = np.full(n, np.nan)
    done = np.full(n, np.nan)
    codes = np.full(n, -1, dtype=np.int16)
    clock = time.perf_counter

    async def one(i: int) -> None:
        try:
            await calls[i % n_channels](requests[i % n_requests], timeout=timeout)
            codes[i] = 0
        except grpc.aio.AioRpcError as error:
            codes[i] = error.code().value[0]
        done[i] = clock()

    loop = asyncio.get_running_loop()
    tasks = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = clock() + 0.05
    frozen = [int(pid) for pid in job["freeze"]["pids"]] if job.get("freeze") else []
    if frozen:
        stop_at = start + float(job["freeze"]["at_s"])
        go_at = stop_at + float(job["freeze"]["for_s"])
        for pid in frozen:
            loop.call_later(stop_at - clock(), os.kill, pid, signal.SIGSTOP)
            loop.call_later(go_at - clock(), os.kill, pid, signal.SIGCONT)
    try:
        i = 0
        while i < n:
            now = clock()
            while i < n and start + schedule[i] <= now:
                sent[i] = now
                tasks.append(loop.create_task(one(i)))
                i += 1
            if i < n:
                wait = start + schedule[i] - clock()
                if wait > 0:
                    await asyncio.sleep(wait)
        await asyncio.wait(tasks, timeout=timeout + 30)
    finally:
        # The calls can all end (their deadlines pass) inside a freeze longer than they wait:
        # never leave a server stopped behind the run.
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for channel in channels:
        await channel.close()
    return _result(
        start, schedule, sent, done, codes, cpu0, cpu1, balance, n_channels, warmup_errors
    )


def run_sync(job: dict[str, Any], requests: list[bytes], schedule: np.ndarray) -> dict:
    if job.get("balance_dir"):
        raise ValueError("the sync client does not balance connections; use the aio client")
    channels = [
        grpc.insecure_channel(job["target"], options=[LOCAL_POOL]) for _ in range(job["channels"])
    ]
    calls = [channel.unary_unary(job["method"]) for channel in channels]
    n_channels, n_requests = len(calls), len(requests)
    timeout = float(job["timeout_s"])
    warmup_errors: collections.Counter[str] = collections.Counter()
    for i in range(job["warmup"]):
        try:
            calls[i % n_channels](requests[i % n_requests], timeout=10)
        except grpc.RpcError as error:
            warmup_errors[error.code().name] += 1
    n = len(schedule)
    sent = np.full(n, np.nan)
    done = np.full(n, np.nan)
    codes = np.full(n, -1, dtype=np.int16)
    finished = threading.Semaphore(0)
    clock = time.perf_counter

    def on_done(future: grpc.Future, i: int) -> None:
        done[i] = clock()
        error = future.exception()
        codes[i] = 0 if error is None else error.code().value[0]
        finished.release()

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = clock() + 0.05
    for i, at in enumerate(schedule):
        wait = start + at - clock()
        if wait > 0:
            time.sleep(wait)
        sent[i] = clock()
        future = calls[i % n_channels].future(requests[i % n_requests], timeout=timeout)
        future.add_done_callback(lambda f, i=i: on_done(f, i))
    for _ in range(n):
        if not finished.acquire(timeout=timeout + 30):
            break
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for channel in channels:
        channel.close()
    return _result(start, schedule, sent, done, codes, cpu0, cpu1, {}, n_channels, warmup_errors)


def _result(
    start: float,
    schedule: np.ndarray,
    sent: np.ndarray,
    done: np.ndarray,
    codes: np.ndarray,
    cpu0: Any,
    cpu1: Any,
    balance: dict[str, int],
    n_channels: int,
    warmup_errors: dict[str, int],
) -> dict:
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "schedule": schedule,
        "sent": sent - start,
        "done": done - start,
        "codes": codes,
        # start: time.perf_counter() of offset 0, CLOCK_MONOTONIC on Linux, which other
        # processes on the machine share (bench/serving_reload.py aligns its reloads by it).
        "meta": {
            "cpu_s": cpu,
            "channels": n_channels,
            "balance": balance,
            "start": start,
            "warmup_errors": dict(warmup_errors),  # failed warm-up calls by status
        },
    }


def job_for(
    target: str,
    method: str,
    requests: list[bytes],
    rate: float,
    n: int,
    *,
    seed: int = 0,
    client: str = "aio",
    channels: int = 8,
    workers: int = 1,
    balance_dir: Path | None = None,
    freeze: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON job of one run: ``n`` calls of ``method`` at ``rate``/s, 2 s deadlines;
    ``freeze``: stop the server for a while (see the module's docstring; aio client only)."""
    if freeze is not None and client != "aio":
        raise ValueError(f"freeze needs the aio client, not {client!r}")
    return {
        "target": target,
        "method": method,
        "requests": [base64.b64encode(r).decode() for r in requests],
        "rate": rate,
        "n": n,
        "seed": seed,
        "timeout_s": 2.0,
        "client": client,
        "channels": channels,
        "workers": workers,
        "balance_dir": None if balance_dir is None else str(balance_dir),
        "warmup": 100,
        "freeze": freeze,
    }


def drive(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run ``job`` with this script in its own process; return the arrays it wrote, with
    ``meta`` decoded."""
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.npz"
        job_path.write_text(json.dumps(job))
        subprocess.run(
            [sys.executable, __file__, str(job_path), str(out_path)],
            check=True,
            cwd=Path(__file__).parent.parent,
            timeout=timeout_s,
        )
        with np.load(out_path) as out:
            arrays = {key: out[key] for key in out.files}
    arrays["meta"] = json.loads(str(arrays["meta"]))
    return arrays


def main(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    requests = [base64.b64decode(r) for r in job["requests"]]
    schedule = schedule_of(float(job["rate"]), int(job["n"]), int(job["seed"]))
    if job["client"] == "aio":
        result = asyncio.run(run_aio(job, requests, schedule))
    else:
        result = run_sync(job, requests, schedule)
    meta = result.pop("meta")
    np.savez(out_path, meta=json.dumps(meta), **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
