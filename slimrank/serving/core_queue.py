"""Calls waiting inside gRPC's core, where the server's own code cannot see them.

A grpc.aio server takes calls from gRPC's core one at a time, on its event loop. When the loop
is busy (a handler running on it, or starved of the GIL by a handler thread), new calls wait in
the core, unseen: an admission check that counts only the calls the server's code holds lets
that queue grow without bound (offered twice its capacity, the calls it answered had waited
half a second). Channelz counts each call when it reaches the core (``callsStarted``) and when
it ends (``callsSucceeded`` + ``callsFailed``, which include calls that expired before the
server took them), so ``started - ended - held`` is the queue in the core, give or take the
calls the server has finished and the core not yet counted (see :meth:`CoreQueue.waiting`).

Reading channelz costs 0.06 ms on an idle server and 0.13-0.4 ms of CPU on a busy one (the
core renders a JSON document; the server keeps no channelz trace, which made it 0.10 and
0.137 ms), up to a quarter of a call, so :meth:`CoreQueue.waiting` reads
it only when a queue can have formed: not when the server's code was idle just before the call
(``idle_s``), nor early in a busy spell (``busy_s``: a queue that has waited less than that is
short), and at most once per ``refresh_s``. In between, the count is carried forward: plus the
calls expected to have arrived since the last read (at the rate seen between the last two
reads), minus the calls taken since.

Channelz is reached through ``grpc._cython.cygrpc``, the functions grpcio-channelz's own
servicer calls; when they are missing or channelz is off, :meth:`CoreQueue.of_new_server`
returns None and admission counts the held calls only. The server is found as the one whose
channelz id appeared between :meth:`CoreQueue.server_ids` before it was created and
:meth:`CoreQueue.of_new_server` once it started.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from slimrank.serving.admission import is_stall, smoothed

log = logging.getLogger(__name__)

# At most one read this often. 10 ms saved about 5% of server CPU per call on ml-100k and
# refused no more calls there (bench/results/serving_ab_s22-refresh-*), but a cold 1M server
# refused more of a client's first bursts (README, "The request path"), so 5 ms stays.
DEFAULT_REFRESH_S = 0.005
_RATE_WINDOW_S = 1.0  # reads further apart than this give no arrival rate
_TAKE_MEMORY_S = 1.0  # a take interval older than this is forgotten


def _cygrpc() -> Any:
    try:
        from grpc._cython import cygrpc
    except ImportError:  # pragma: no cover - grpcio always ships it today
        return None
    if not hasattr(cygrpc, "channelz_get_servers") or not hasattr(cygrpc, "channelz_get_server"):
        return None
    return cygrpc


def _server_ids(cygrpc: Any) -> list[int]:
    """Return the channelz ids of this process's gRPC servers (every page)."""
    ids: list[int] = []
    start = 0
    while True:
        page = json.loads(cygrpc.channelz_get_servers(start))
        ids += [int(s["ref"]["serverId"]) for s in page.get("server", [])]
        if page.get("end", True) or not ids:
            return ids
        start = max(ids) + 1


class CoreQueue:
    """The number of calls queued in one gRPC server's core (loop thread only)."""

    def __init__(
        self,
        read: Callable[[], tuple[int, int]],
        refresh_s: float = DEFAULT_REFRESH_S,
        clock: Callable[[], float] = time.perf_counter,
        idle_s: float = 0.001,
        busy_s: float = 0.003,
    ) -> None:
        self._read: Callable[[], tuple[int, int]] | None = read  # () -> (started, ended)
        self.refresh_s = refresh_s
        self.idle_s = idle_s  # a loop idle this long has taken everything queued before
        self.busy_s = busy_s  # a busy spell shorter than this leaves no queue worth a read
        self._clock = clock
        self._read_at = -float("inf")
        self._queued = 0  # at the last read
        self._lost = 0  # calls the core ended without this server taking them, at least
        self._taken_at_read = 0
        self._started_at_read = 0
        self._arrivals_per_s = 0.0  # between the last two reads
        self._counted_at = -float("inf")  # when _queued was last known (a read or a reset)
        self.last_waiting = 0  # what the last waiting() returned
        # How long each queued call holds up those behind it: the mean time between two calls
        # taken while calls were waiting (None until such a pair was seen).
        self.take_interval_s: float | None = None
        self.smoothing = 0.05
        self._take_seen_at = -float("inf")

    @staticmethod
    def server_ids() -> set[int] | None:
        """Return the channelz ids of this process's gRPC servers, None if unreadable."""
        cygrpc = _cygrpc()
        if cygrpc is None:
            return None
        try:
            return set(_server_ids(cygrpc))
        except (ValueError, KeyError, TypeError):
            return None

    @classmethod
    def of_new_server(
        cls, before: set[int] | None, refresh_s: float = DEFAULT_REFRESH_S
    ) -> CoreQueue | None:
        """Return the queue of the one gRPC server started since ``before`` (the ids
        :meth:`server_ids` gave before creating it), or None when channelz cannot tell which
        (unreadable, off, or several servers started meanwhile)."""
        after = cls.server_ids()
        if before is None or after is None:
            log.info("channelz unavailable: admission counts held calls only")
            return None
        new = after - before
        if len(new) != 1:
            log.info("channelz shows %d new servers: admission counts held calls only", len(new))
            return None
        (server_id,) = new
        cygrpc = _cygrpc()

        def read() -> tuple[int, int]:
            data = json.loads(cygrpc.channelz_get_server(server_id))["server"]["data"]
            ended = int(data.get("callsSucceeded", 0)) + int(data.get("callsFailed", 0))
            return int(data.get("callsStarted", 0)), ended

        return cls(read, refresh_s)

    def observe_take(self, interval_s: float, usual_s: float = 0.0) -> None:
        """Record the time between two calls taken while calls were waiting in the core.

        An interval that is a stall (:func:`is_stall`) against ``usual_s`` (a handler's mean
        time) or the average is left out: the process stood still between the two takes, which
        is not what a call costs. (Taken as the first sample after the average was forgotten, a
        0.3 s freeze of the 1M server became the cost of every queued call, and the server
        refused nearly every call for the next second.)"""
        now = self._clock()
        if now - self._take_seen_at > _TAKE_MEMORY_S:
            self.take_interval_s = None  # an old average says little about this queue
        if is_stall(interval_s, max(usual_s, self.take_interval_s or 0.0)):
            return
        self.take_interval_s = smoothed(self.take_interval_s, interval_s, self.smoothing)
        self._take_seen_at = now

    def take_interval(self) -> float | None:
        """The mean take interval, or None when no queue was seen in the last second (e.g. a
        stall of the whole machine is not held against the next small queue)."""
        if self._clock() - self._take_seen_at > _TAKE_MEMORY_S:
            return None
        return self.take_interval_s

    def waiting(
        self,
        held: int,
        taken: int,
        idle_s: float = 0.0,
        busy_s: float = float("inf"),
        fresh: bool = False,
    ) -> int:
        """Return how many calls wait in the core.

        ``held``: calls the server's code has taken and not finished (the one being admitted
        included); ``taken``: every call taken so far (a running count); ``idle_s``: how long
        the server's code had held no call before this one; ``busy_s``: how long it has held
        calls without such an idle spell. A loop idle for ``self.idle_s`` or more would have
        taken any call queued before that, and a busy spell shorter than ``self.busy_s`` has
        let at most that much wait pile up behind it, so nothing is read then (and 0 is
        returned): at low and moderate rates most calls cost no read. ``fresh`` reads
        channelz whatever these say (e.g. once the server stood still: a queue formed unseen).
        """
        now = self._clock()
        if self._read is None:  # a read failed: not counted any more
            return 0
        if not fresh and (idle_s >= self.idle_s > 0 or busy_s < self.busy_s):
            self._queued, self._taken_at_read, self._counted_at = 0, taken, now
            self.last_waiting = 0
            return 0
        if fresh or now - self._read_at >= self.refresh_s:
            try:
                started, ended = self._read()
            except (ValueError, KeyError, TypeError) as err:  # never fail a call over it
                log.warning("channelz unreadable (%s): the core's queue is no longer counted", err)
                self._read, self.last_waiting = None, 0
                return 0
            since = now - self._read_at
            if 0 < since <= _RATE_WINDOW_S:
                self._arrivals_per_s = (started - self._started_at_read) / since
            # Not started - ended - held: that also counts the calls this server has finished
            # and the core not yet counted as ended (on a busy machine, a sequential caller's
            # previous call: a queue of 1-2 that is not there). The calls started and not
            # taken, less those the core ended without this server taking them (expired,
            # cancelled, refused by gRPC): at least ended - (taken - held) of them, the most
            # any read has shown. Never more than started - ended - held.
            self._lost = max(self._lost, ended - (taken - held))
            self._queued = started - taken - self._lost
            self._taken_at_read, self._started_at_read = taken, started
            self._read_at = self._counted_at = now
        arrived = self._arrivals_per_s * (now - self._counted_at) if self._arrivals_per_s else 0.0
        self.last_waiting = max(0, round(self._queued + arrived) - (taken - self._taken_at_read))
        return self.last_waiting
