"""Admission: a call is accepted or refused when it arrives, before it waits anywhere.

:class:`Admission` counts the calls in progress: Recommender calls up to ``limit`` (the model
work a process takes on at once), every unary call up to ``total`` (so health and admin calls
cannot pile up either). A call over either bound is refused at once with RESOURCE_EXHAUSTED by
the caller of :meth:`Admission.enter`, which also counts it under the :class:`Refusal` that
:meth:`~Admission.enter` returns for it (which bound refused it). An accepted call holds a
:class:`Ticket` until everything it started has finished (its task and, when its handler runs
on a thread, that thread's work), so a call cancelled by its client still holds its slot while
a thread works on it.

While a bundle loads beside the serving threads (:class:`LoadActivity`), the wait bound is
``reload_wait_s`` instead: the load takes the GIL and a core's time slices from the event
loop for seconds, so calls queue behind it for tens of milliseconds at a load the server
otherwise answers at once. That queue is the load's, not overload, and refusing it would fail
calls that are answered a few milliseconds later. The same holds for any queue that forms
while the calls offered over the last moment (:class:`OfferedRate`) are well below what the
server can do (``overload_fraction``): a random burst, a freeze of the machine, a neighbour
taking the core for a while. Such a queue is worked off at the server's spare capacity.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import math
import threading
import time
from collections.abc import Callable, Iterator

# A time longer than STALL_MIN_S and than STALL_FACTOR times the usual one is a stall: the
# process stood still (the machine froze it, a long garbage collection), which is not what a
# call costs. Far above what overload or a burst makes of the time between two calls.
STALL_MIN_S = 0.050
STALL_FACTOR = 4.0


def is_stall(seconds: float, usual: float) -> bool:
    """Whether ``seconds``, where ``usual`` is expected, means the process stood still."""
    return usual > 0 and seconds > max(STALL_MIN_S, STALL_FACTOR * usual)


def smoothed(mean: float | None, sample: float, smoothing: float) -> float:
    """``mean`` moved ``smoothing`` of the way towards ``sample``, a stall counting as
    ``STALL_FACTOR`` times ``mean``; ``sample`` itself when there is no mean yet."""
    if not mean:
        return sample
    if is_stall(sample, mean):
        sample = STALL_FACTOR * mean
    return mean + smoothing * (sample - mean)


class Refusal(enum.Enum):
    """Which bound refused a call: the ``reason`` label of ``slimrank_shed_requests_total``.

    ``in_progress``: ``limit`` model calls were in progress (``--max-inflight``); ``total``:
    ``total`` calls of any kind were (``max_pending_rpcs``); ``wait``: the calls ahead would
    have kept it waiting over the bound in force (``--max-wait-ms``, ``--burst-wait-ms``, a
    reload's or a stall's). An operator raises ``--max-inflight`` for the first, and reads the
    second as overload, or as a queue the server's pace does not explain.
    """

    IN_PROGRESS = "in_progress"
    TOTAL = "total"
    WAIT = "wait"


class Ticket:
    """One accepted call's slot; given back when every :meth:`hold` has been released."""

    __slots__ = ("_admission", "_holds", "_limited")

    def __init__(self, admission: Admission, limited: bool) -> None:
        self._admission = admission
        self._limited = limited
        self._holds = 1

    def hold(self) -> None:
        """Keep the slot until one more :meth:`release` (e.g. while a thread runs the handler)."""
        with self._admission.lock:
            self._holds += 1

    def release(self, *_: object) -> None:
        """Release one hold; the last one gives the slot back. Usable as a done callback."""
        admission = self._admission
        with admission.lock:
            self._holds -= 1
            if self._holds == 0:
                admission.total_in_progress -= 1
                if self._limited:
                    admission.limited_in_progress -= 1


class LoadActivity:
    """Whether a bundle is loading beside the serving threads, and whether the server just
    stood still (thread-safe).

    Each reload runs inside :meth:`running`; :meth:`active` is True while one does and for
    ``tail_s`` after it ended (the queue it left is worked off, the old snapshot freed).
    The serving loop reports each stall it sees between two calls (:meth:`stalled`), and a
    watch thread (:class:`~slimrank.serving.freeze_watch.FreezeWatch`) ticks every
    ``interval_s`` (:meth:`tick`), so a stall is known from the tick that comes late and,
    before that tick, from the one that is overdue (:meth:`stall_s`).
    """

    def __init__(self, tail_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.tail_s = tail_s
        self._clock = clock
        self._lock = threading.Lock()
        self._running = 0
        self._ended_at = -math.inf
        self._stalled_at = -math.inf
        self._stall_s = 0.0
        self._stalls = 0  # stalls recorded, extensions included
        self._watch_interval_s: float | None = None  # None: no watch ticks
        self._ticked_at = -math.inf

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """A load runs within the block."""
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                self._ended_at = self._clock()

    def stalled(self, seconds: float) -> bool:
        """The server just stood still for ``seconds`` (the machine froze the process): see
        :meth:`stall_s`. Returns whether this is a new stall, not one within the last one's
        tail (the watch and the serving loop can both report the same one)."""
        with self._lock:
            now = self._clock()
            new = now - self._stalled_at >= 2 * self._stall_s
            if new:
                self._stall_s = 0.0  # the last stall's tail is over
            self._stall_s = max(self._stall_s, seconds)
            self._stalled_at = now
            self._stalls += 1
            return new

    def watched(self, interval_s: float | None) -> None:
        """A watch ticks every ``interval_s`` from now on (None: it stopped)."""
        with self._lock:
            self._watch_interval_s = interval_s
            self._ticked_at = self._clock()

    def tick(self) -> bool:
        """The watch woke up; True when it woke a stall late (:func:`is_stall` against its
        interval: the whole process stood still meanwhile), which :meth:`stalled` records."""
        interval = self._watch_interval_s
        if interval is None:
            return False
        now = self._clock()
        gap, self._ticked_at = now - self._ticked_at, now
        return is_stall(gap, interval) and self.stalled(gap)

    def stall_s(self) -> float:
        """How long the server stood still, while that matters, else 0.0: the last stall's
        length for twice as long as it lasted (its tail), or the time since the watch's last
        tick once that is a stall (the process stood still until just now and the watch has
        not run yet). The calls a stall held up have waited that long already; a server
        below capacity works off what arrived in a stall within its tail."""
        return self.stall()[0]

    def stall(self) -> tuple[float, tuple[int, float | None]]:
        """:meth:`stall_s` and a mark that changes whenever a stall is recorded (or extended)
        or a watch tick becomes overdue: a caller that saw the mark before knows the stall."""
        now = self._clock()
        stall = self._stall_s if now - self._stalled_at < 2 * self._stall_s else 0.0
        interval, ticked_at = self._watch_interval_s, self._ticked_at
        if interval is not None and is_stall(now - ticked_at, interval):
            return max(stall, now - ticked_at), (self._stalls, ticked_at)
        return stall, (self._stalls, None)

    def active(self) -> bool:
        """True while a load runs and for ``tail_s`` after the last one ended."""
        return self._running > 0 or self._clock() - self._ended_at < self.tail_s


class Admission:
    """Bounds calls in progress: ``limit`` for the limited ones, ``total`` for all (thread-safe).

    With ``max_wait_s``, a limited call is also refused when the limited calls already in
    progress, and the ``queued`` calls ahead of it that the caller knows of (e.g. in gRPC's
    core, :mod:`slimrank.serving.core_queue`), are expected to keep it waiting longer than
    that. Calls in progress cost the mean time a handler takes (an exponential average of
    :meth:`observe`) over ``parallel`` handlers; queued calls cost ``take_interval_s`` each
    when the caller knows how fast its queue drains (the time between two accepted calls
    taken while calls waited: a handler's time plus gRPC's own work per call), else the same
    as a call in progress. That bound follows the cost of a call as it changes (a
    new featurizer, a larger bundle), where a fixed ``limit`` is right for one cost only.

    With ``burst_wait_s`` the bound is that longer one until calls have been waiting without
    a break for ``burst_wait_s`` (the caller says how long, ``standing_s``): a burst that a
    server below capacity works off is let through, and only a standing queue, i.e. overload,
    is cut down to ``max_wait_s`` (the queue discipline of CoDel as Facebook applies it to
    server queues; see "Fail at Scale", ACM Queue 13(8), 2015). :class:`StandingQueue`
    tells how long the queue has stood, and remembers overload for ``burst_recovery_s``.

    While ``loading`` is active, and while the calls offered keep the server below
    ``overload_fraction`` of its capacity (the caller says how busy, ``load``: calls offered
    per second times what one costs; None: unknown), the bound is at least ``reload_wait_s``
    (None: no change): such a queue is transient, not overload. For the calls a stall of
    the server held up, the bound is at least the stall's length (the
    caller says which calls those are, ``stall_s``; else every call for twice as long as the
    stall lasted, :meth:`LoadActivity.stall_s`). At a transient load, so is the bound of
    every call in the stall's tail: the calls that come while its backlog is worked off wait
    behind it, and below capacity it drains. A bound widened so also lifts ``limit`` to
    ``total``: the calls that queued behind the load or the stall may be in progress (queued
    for a handler thread) as long as they are expected within that bound, which ``limit``
    would otherwise cut at a few calls (seen: a freeze's 48 calls on a busy machine, 11 of
    them refused at 8 in progress although expected within the stall's 0.33 s).
    """

    def __init__(
        self,
        limit: int,
        total: int,
        max_wait_s: float | None = None,
        parallel: int = 1,
        smoothing: float = 0.05,
        burst_wait_s: float | None = None,
        burst_recovery_s: float = 0.25,
        reload_wait_s: float | None = None,
        loading: LoadActivity | None = None,
        overload_fraction: float = 0.0,
    ) -> None:
        if limit < 1 or total < limit:
            raise ValueError(f"Admission(limit={limit}, total={total}): need 1 <= limit <= total")
        self.limit = limit
        self.total = total
        self.max_wait_s = max_wait_s
        self.burst_wait_s = burst_wait_s
        self.burst_recovery_s = burst_recovery_s
        self.reload_wait_s = reload_wait_s
        self.loading = loading
        self.overload_fraction = overload_fraction
        self.parallel = max(1, parallel)
        self.smoothing = smoothing
        self.mean_service_s = 0.0  # no estimate until the first observe()
        self.lock = threading.Lock()
        self.limited_in_progress = 0
        self.total_in_progress = 0
        # Set when the server shuts down: its callers refuse new calls with UNAVAILABLE (which
        # clients retry elsewhere) while the calls in progress finish.
        self.draining = False

    def observe(self, service_s: float) -> None:
        """Record how long one limited call's handler took."""
        with self.lock:
            self.mean_service_s = smoothed(self.mean_service_s, service_s, self.smoothing)

    @property
    def per_call_s(self) -> float:
        """A handler's mean time over the ``parallel`` handlers: how long one call in progress
        holds up the calls behind it (0.0 until the first :meth:`observe`)."""
        return self.mean_service_s / self.parallel

    def expected_wait_s(self, queued: int = 0, take_interval_s: float | None = None) -> float:
        """How long a limited call admitted now would wait for those ahead of it."""
        per_call = self.per_call_s
        queued_s = queued * (per_call if take_interval_s is None else take_interval_s)
        return self.limited_in_progress * per_call + queued_s

    def wait_bound_s(
        self,
        standing_s: float | None = None,
        stall_s: float | None = None,
        load: float | None = None,
    ) -> float | None:
        """The longest expected wait a limited call is admitted with when calls have waited
        without a break for ``standing_s`` (None: unknown, which counts as overload).
        ``stall_s``: how long the calls ahead of this one were held up by a stall of the
        server (None: the last stall's, :meth:`LoadActivity.stall_s`, for its whole tail).
        ``load``: the share of the server's capacity offered of late (None: unknown)."""
        return self._bound(standing_s, stall_s, load)[0]

    def transient(self, load: float | None) -> bool:
        """Whether a queue at offered ``load`` (a share of capacity) is transient."""
        return load is not None and load < self.overload_fraction

    def _bound(
        self, standing_s: float | None, stall_s: float | None, load: float | None
    ) -> tuple[float | None, bool]:
        """:meth:`wait_bound_s` and whether a load, a stall or a transient queue widened it."""
        burst = self.burst_wait_s
        if self.max_wait_s is None or burst is None or standing_s is None or standing_s >= burst:
            bound = self.max_wait_s
        else:
            bound = max(burst, self.max_wait_s)
        if bound is None:
            return bound, False
        usual = bound
        loading = self.loading
        transient = self.transient(load)
        if self.reload_wait_s is not None and (
            (loading is not None and loading.active()) or transient
        ):
            bound = max(bound, self.reload_wait_s)
        if loading is not None:
            # Below capacity, the calls that come while a stall's backlog is worked off
            # may wait for it too: it drains, where under overload it would not.
            tail = loading.stall_s() if stall_s is None or transient else 0.0
            bound = max(bound, tail, stall_s or 0.0)
        return bound, bound > usual

    def enter(
        self,
        limited: bool,
        queued: int = 0,
        take_interval_s: float | None = None,
        standing_s: float | None = None,
        stall_s: float | None = None,
        load: float | None = None,
    ) -> Ticket | Refusal:
        """Take a slot and return its ticket, or the :class:`Refusal` when the call must be
        refused.

        ``queued``: calls known to wait ahead of this one besides those in progress;
        ``take_interval_s``: how long each of them holds up the ones behind it, if known;
        ``standing_s``: how long calls have waited without a break (see ``burst_wait_s``);
        ``stall_s``, ``load``: see :meth:`wait_bound_s`."""
        with self.lock:
            if self.total_in_progress >= self.total:
                return Refusal.TOTAL
            if limited:
                bound, widened = self._bound(standing_s, stall_s, load)
                if self.limited_in_progress >= (self.total if widened else self.limit):
                    return Refusal.IN_PROGRESS
                if bound is not None and self.expected_wait_s(queued, take_interval_s) > bound:
                    return Refusal.WAIT
            self.total_in_progress += 1
            if limited:
                self.limited_in_progress += 1
        return Ticket(self, limited)


class OfferedRate:
    """Calls offered per second over the last ``window_s`` (one caller thread; times from
    its clock).

    Counted when the server takes them, accepted or refused. A window of a few hundred
    milliseconds keeps the rate when a freeze delays calls (they are taken late, but within
    it) and lets it rise within tens of milliseconds when overload begins. Until a window has
    passed since the first call, the rate is over the time since then (at least
    ``min_span_s``).

    A freeze longer than the window is another matter: the calls that queued meanwhile are
    taken in a rush after it, as fast as the server works, and read as a rate several times
    the real one (on ml-100k, a 0.7 s freeze at 200 calls/s then looked like overload, and
    54-65 of the calls that came just after it were refused: ``bench/serving_ab.py
    --freeze``). While the caller is in a stall's tail (``hold``), the rate is the one last
    read outside it.
    """

    def __init__(self, window_s: float = 0.2, min_span_s: float = 0.02) -> None:
        if window_s <= 0 or min_span_s <= 0:
            raise ValueError(f"OfferedRate({window_s}, {min_span_s}): need both > 0")
        self.window_s = window_s
        self.min_span_s = min_span_s
        self._times: collections.deque[float] = collections.deque()
        self._first: float | None = None
        self._outside_stall = 0.0  # the rate last read outside a stall's tail

    def note(self, now: float, hold: bool = False) -> float:
        """Count one call offered at ``now``; return the calls per second up to it, or with
        ``hold`` (a stall's tail) the rate last returned without it."""
        times = self._times
        times.append(now)
        if self._first is None:
            self._first = now
        edge = now - self.window_s
        while times[0] <= edge:
            times.popleft()
        if hold:
            return self._outside_stall
        span = min(self.window_s, now - self._first)
        self._outside_stall = len(times) / max(span, self.min_span_s)
        return self._outside_stall


class LoadMemory:
    """An offered load at or above ``threshold`` is remembered for ``hold_s`` (one caller
    thread; times from its clock).

    Under overload the load read over a short window dips below the threshold for moments
    (a take interval read low, a lull in arrivals); a queue admitted as transient in such a
    moment waits long (at twice its capacity, accepted p99 31-51 ms in three of six runs on
    ml-100k, against 15-19 ms without the transient rule). As overload is remembered for
    ``burst_recovery_s`` after a queue stood (:class:`StandingQueue`), so is a high load.
    """

    def __init__(self, threshold: float, hold_s: float) -> None:
        self.threshold = threshold
        self.hold_s = hold_s
        self._high_at = -math.inf

    def load(self, now: float, load: float) -> float:
        """``load``, or at least ``threshold`` while a load that high was seen within
        ``hold_s`` before ``now``."""
        if load >= self.threshold:
            self._high_at = now
        elif now - self._high_at < self.hold_s:
            return self.threshold
        return load


class HeldUpCalls:
    """Which calls a stall of the server held up: those taken up to :attr:`last_call` (the
    serving loop numbers the calls it takes; loop thread only).

    When a stall is first seen (its mark, :meth:`LoadActivity.stall`, is new), the calls in
    gRPC's core queue are the ones it held up, so the loop reads that queue afresh
    (:meth:`needs_read`) and reports the last call in it (:meth:`counted`). The core reads
    what queued in the kernel meanwhile over a few milliseconds after the process runs again
    (seen: 24 of 48 calls counted at once, all 48 some 6-9 ms later), so for ``catch_up_s``
    after the stall was seen the queue is read again, every ``reread_s`` at most. A stall's
    length is allowed to those calls only (:meth:`allowance`): under overload, calls that
    arrive after it would otherwise be admitted to wait as long as it lasted.
    """

    def __init__(self, catch_up_s: float = 0.025, reread_s: float = 0.002) -> None:
        self.catch_up_s = catch_up_s
        self.reread_s = reread_s
        self.last_call = 0
        self._mark: object = None
        self._seen_at = -math.inf
        self._read_at = -math.inf

    def needs_read(self, now: float, mark: object) -> bool:
        """Whether the core's queue should be read afresh at ``now`` for the stall ``mark``."""
        if mark != self._mark:
            self._mark, self._seen_at = mark, now
            return True
        return now - self._seen_at < self.catch_up_s and now - self._read_at >= self.reread_s

    def counted(self, now: float, last_queued: int) -> None:
        """A read at ``now`` found calls queued up to call number ``last_queued``."""
        self._read_at = now
        self.last_call = max(self.last_call, last_queued)

    def allowance(self, call: int, stall_s: float) -> float:
        """The stall length ``stall_s`` for call number ``call`` if the stall held it up."""
        return stall_s if call <= self.last_call else 0.0


class StandingQueue:
    """How long calls have waited without a break, as :meth:`Admission.enter`'s ``standing_s``
    reads it (one caller thread; times from the caller's clock).

    The caller says when nothing waits (:meth:`empty`). Once calls have waited ``burst_wait_s``
    without a break (overload), :meth:`standing` stays infinite until none have for
    ``recovery_s``: under sustained overload the queue empties for moments between refusals,
    and a fresh burst allowance each time would let it grow back to ``burst_wait_s``, so
    refusals would go out only after that long (CoDel likewise stays in its dropping state
    when it re-enters it soon after leaving).
    """

    def __init__(self, burst_wait_s: float | None, recovery_s: float, now: float) -> None:
        self.burst_wait_s = burst_wait_s
        self.recovery_s = recovery_s
        self.since = now  # since when calls have waited without a break
        self.stood_at = -math.inf  # when calls last had waited burst_wait_s without a break

    def empty(self, now: float) -> None:
        """Nothing waits at ``now``."""
        self.since = now

    def standing(self, now: float) -> float:
        """How long calls have waited without a break at ``now`` (inf: overload remembered)."""
        standing = now - self.since
        if self.burst_wait_s is None:
            return standing
        if standing >= self.burst_wait_s:
            self.stood_at = now
        elif now - self.stood_at < self.recovery_s:
            return math.inf
        return standing
