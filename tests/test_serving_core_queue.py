"""The calls queued in gRPC's core: channelz's counts of a real server, and the countdown
between two reads."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest

from slimrank.serving.core_queue import CoreQueue


def test_a_real_server_shows_the_calls_its_busy_loop_has_not_taken() -> None:
    seen: list[int] = []
    taken = 0

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal taken
        taken += 1
        if request == b"block":
            time.sleep(0.5)  # the loop cannot take the calls that arrive meanwhile
            seen.append(queue.waiting(held=1, taken=taken))
        return request

    async def main() -> None:
        nonlocal queue
        before = CoreQueue.server_ids()
        assert before is not None
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        queue = CoreQueue.of_new_server(before, refresh_s=0.0)
        assert queue is not None
        done = threading.Event()

        def client() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/t.T/M")
                call(b"warm", timeout=10)
                first = call.future(b"block", timeout=10)
                time.sleep(0.1)
                rest = [call.future(b"x", timeout=10) for _ in range(5)]
                assert first.result() == b"block"
                assert [f.result() for f in rest] == [b"x"] * 5
            done.set()

        thread = threading.Thread(target=client)
        thread.start()
        while not done.is_set() and thread.is_alive():
            await asyncio.sleep(0.02)
        thread.join()
        assert queue.waiting(held=0, taken=taken) == 0  # everything answered
        await server.stop(None)

    queue: CoreQueue | None = None
    asyncio.run(main())
    assert seen == [5]  # the five calls sent while the handler held the loop


def test_a_read_that_fails_stops_counting_instead_of_failing_calls() -> None:
    reads = []

    def gone() -> tuple[int, int]:
        reads.append(1)
        raise ValueError("Failed to get the server, please ensure your server_id==7 is valid")

    queue = CoreQueue(gone, refresh_s=0.0)
    assert queue.waiting(held=1, taken=5) == 0
    assert queue.waiting(held=1, taken=6) == 0
    assert len(reads) == 1  # not read again


def test_calls_finished_here_but_not_yet_ended_in_the_core_are_not_a_queue() -> None:
    """A sequential caller on a busy machine: the call before this one has been answered (not
    held any more) but the core has not counted it ended, so started - ended - held shows a
    queue of 1 that is not there (CI refused such a call); started - taken shows none. Calls
    the core ended without this server taking them (expired in its queue) are learnt from a
    read where ended exceeds the calls finished here, and not counted as queued after."""
    reads: list[tuple[int, int]] = [(10, 8), (30, 24), (40, 28), (44, 33)]
    queue = CoreQueue(lambda: reads.pop(0), refresh_s=0.0)
    assert queue.waiting(held=1, taken=10) == 0  # 10 - 8 - 1 = 1 by the ends alone
    # 5 calls expired in the core: 24 ended, 19 finished here (20 taken, 1 held); 5 queued.
    assert queue.waiting(held=1, taken=20) == 5
    # 25 finished here, 2 of them not yet ended in the core: 40 - 28 - 1 = 11 by the ends;
    # 40 started - 26 taken - the 5 that expired = 9.
    assert queue.waiting(held=1, taken=26) == 9
    # One more expired (6 now: 33 ended, 27 finished here): 44 - 30 - 6.
    assert queue.waiting(held=3, taken=30) == 8


def test_between_reads_the_calls_taken_count_down_the_last_read() -> None:
    reads: list[tuple[int, int]] = [(20, 2), (60, 42)]  # (started, ended) per read
    now = [0.0]
    queue = CoreQueue(lambda: reads.pop(0), refresh_s=0.002, clock=lambda: now[0])
    assert queue.waiting(held=3, taken=5) == 15  # 20 started - 2 ended - 3 held
    assert queue.waiting(held=3, taken=9) == 11  # 4 taken since: no read within 2 ms
    assert queue.waiting(held=3, taken=40) == 0  # never below zero
    now[0] = 0.0021
    assert queue.waiting(held=1, taken=41) == 17  # read again: 60 - 42 - 1
    assert reads == []


def test_between_reads_the_arrival_rate_of_the_last_two_reads_carries_the_count() -> None:
    reads: list[tuple[int, int]] = [(100, 80), (120, 90)]  # (started, ended) per read
    now = [0.0]
    queue = CoreQueue(lambda: reads.pop(0), refresh_s=0.005, clock=lambda: now[0])
    assert queue.waiting(held=1, taken=50) == 19  # 100 - 80 - 1; no rate known yet
    now[0] = 0.002
    assert queue.waiting(held=1, taken=52) == 17  # no read within 5 ms; 2 taken
    now[0] = 0.010
    assert queue.waiting(held=1, taken=55) == 29  # read: 120 - 90 - 1
    # 20 calls arrived in the 10 ms between the reads: 2 per ms from now on.
    now[0] = 0.013
    assert queue.waiting(held=1, taken=57) == 29 + 6 - 2
    assert reads == []


def test_after_a_pause_the_arrivals_are_carried_from_the_pause_not_the_last_read() -> None:
    reads: list[tuple[int, int]] = [(100, 90), (120, 100)]
    now = [0.0]
    queue = CoreQueue(lambda: reads.pop(0), refresh_s=0.005, clock=lambda: now[0])
    assert queue.waiting(held=1, taken=10) == 9
    now[0] = 0.010
    assert queue.waiting(held=1, taken=12) == 19  # 2 arrivals per ms
    now[0] = 0.012
    assert queue.waiting(held=1, taken=30, idle_s=0.002) == 0  # the loop paused: none left
    now[0] = 0.014
    assert queue.waiting(held=1, taken=31) == 4 - 1  # 2 ms at 2 per ms since the pause


def test_reads_far_apart_give_no_arrival_rate() -> None:
    reads: list[tuple[int, int]] = [(10, 0), (5010, 5000)]
    now = [0.0]
    queue = CoreQueue(lambda: reads.pop(0), refresh_s=0.005, clock=lambda: now[0])
    assert queue.waiting(held=1, taken=1) == 9
    now[0] = 5.0  # 5,000 arrivals in 5 s: an old average, not the rate of this burst
    assert queue.waiting(held=1, taken=2) == 9
    now[0] = 5.004
    assert queue.waiting(held=1, taken=2) == 9


def test_early_in_a_busy_spell_nothing_is_read() -> None:
    reads = [(40, 1)]
    now = [0.0]
    queue = CoreQueue(lambda: reads.pop(0), refresh_s=0.0, clock=lambda: now[0], busy_s=0.003)
    # Busy for 2 ms since the loop last paused: whatever queued meanwhile is that short.
    assert queue.waiting(held=1, taken=1, busy_s=0.002) == 0
    assert reads == [(40, 1)]
    assert queue.waiting(held=1, taken=2, busy_s=0.0031) == 38
    assert reads == []


def test_after_an_idle_spell_nothing_is_read_and_the_old_count_is_dropped() -> None:
    reads = [(30, 0), (40, 1)]
    now = [0.0]
    queue = CoreQueue(lambda: reads.pop(0), refresh_s=0.002, clock=lambda: now[0], idle_s=0.001)
    assert queue.waiting(held=1, taken=1) == 29
    now[0] = 0.1
    # Idle for 5 ms before this call: whatever was queued then has been taken since.
    assert queue.waiting(held=1, taken=2, idle_s=0.005) == 0
    assert reads == [(40, 1)]  # not read
    assert queue.waiting(held=2, taken=3, idle_s=0.0) == 37  # back to back: read again
    assert reads == []


def test_the_take_interval_is_an_exponential_average_forgotten_after_a_second() -> None:
    now = [0.0]
    queue = CoreQueue(lambda: (0, 0), clock=lambda: now[0])
    assert queue.take_interval() is None  # unknown until two calls were taken from a queue
    queue.observe_take(0.002)
    assert queue.take_interval() == pytest.approx(0.002)
    now[0] = 0.5
    queue.observe_take(0.004)
    assert queue.take_interval() == pytest.approx(0.002 + 0.05 * 0.002)
    now[0] = 1.6  # no queue for over a second: a stall then says nothing about now
    assert queue.take_interval() is None
    queue.observe_take(0.050)
    assert queue.take_interval() == pytest.approx(0.050)  # starts afresh


def test_a_stall_between_two_takes_is_not_taken_for_the_cost_of_a_call() -> None:
    """The process froze for 0.3 s between two takes: with the average forgotten, that interval
    would become the cost of every queued call (30 queued: 9 s expected, all refused)."""
    now = [0.0]
    queue = CoreQueue(lambda: (0, 0), clock=lambda: now[0])
    queue.observe_take(0.3, usual_s=0.003)  # a handler takes 3 ms: a stall, left out
    assert queue.take_interval() is None
    queue.observe_take(0.004, usual_s=0.003)
    assert queue.take_interval() == pytest.approx(0.004)
    queue.observe_take(0.3)  # against the average too
    assert queue.take_interval() == pytest.approx(0.004)
    queue.observe_take(0.012)  # slow, not a stall (under 50 ms): counted
    assert queue.take_interval() == pytest.approx(0.004 + 0.05 * 0.008)
    fresh = CoreQueue(lambda: (0, 0), clock=lambda: now[0])
    fresh.observe_take(0.3)  # nothing to compare it with (no call has finished yet): kept
    assert fresh.take_interval() == pytest.approx(0.3)


def test_the_servers_channelz_node_counts_calls_without_rendering_a_trace() -> None:
    """Admission reads this node every few ms under load; a trace would only make reads dearer."""
    import json

    from grpc._cython import cygrpc

    from slimrank.serving.config import ServerConfig
    from slimrank.serving.server import _options

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def main() -> dict:
        before = CoreQueue.server_ids()
        assert before is not None
        server = grpc.aio.server(options=_options(ServerConfig()))
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        (server_id,) = CoreQueue.server_ids() - before
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(3):
                assert await channel.unary_unary("/t.T/M")(b"x", timeout=10) == b"x"
        node = json.loads(cygrpc.channelz_get_server(server_id))["server"]
        await server.stop(None)
        return node

    node = asyncio.run(main())
    assert "trace" not in node["data"]
    assert int(node["data"]["callsStarted"]) == 3
    assert int(node["data"]["callsSucceeded"]) == 3


def test_serve_the_server_config_and_the_bench_share_one_channelz_read_interval(
    tmp_path: Path,
) -> None:
    """`slimrank serve` without the flag, ServerConfig and bench/serving.py's modes all read
    channelz at most every DEFAULT_REFRESH_S (the bench once kept an old copy of the default)."""
    import sys

    from slimrank.cli import build_parser
    from slimrank.serving.cli import _spec_from_args
    from slimrank.serving.config import ServerConfig
    from slimrank.serving.core_queue import DEFAULT_REFRESH_S

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from serving import Mode

    args = build_parser().parse_args(["serve", "--bundles", str(tmp_path)])
    assert _spec_from_args(args).server.core_queue_refresh_s == DEFAULT_REFRESH_S
    assert ServerConfig().core_queue_refresh_s == DEFAULT_REFRESH_S
    assert Mode("m", "aio").core_queue_refresh_s == DEFAULT_REFRESH_S
    off = build_parser().parse_args(["serve", "--core-queue-refresh-ms", "-1"])
    assert _spec_from_args(off).server.core_queue_refresh_s is None
