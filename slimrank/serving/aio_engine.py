"""The grpc.aio engine: calls are admitted on the event loop, handlers stay synchronous.

One event loop thread per process runs grpc.aio for every server the process starts (grpc.aio
binds its completion-queue poller to the first loop that uses it, so one loop is also the
safe choice). For each call, on the loop:

1. :class:`ServingInterceptor` finds the handler and, for a unary call, takes an admission
   slot (:mod:`slimrank.serving.admission`, counting the calls still queued in gRPC's core,
   :mod:`slimrank.serving.core_queue`) or refuses the call at once with
   RESOURCE_EXHAUSTED, counted in ``slimrank_shed_requests_total``. This runs before the
   request message is read and before any await, so a refused call never waits behind
   accepted work; the refusal is sent without reading the request.
2. The servicers' sync methods (``Recommend(request, context)`` ...) run unchanged, either
   inline on the loop (``handler_threads=0``; ``RecommendBatch`` then on a thread of its
   own) or on a small thread pool, with a
   :class:`SyncContext` standing in for ``grpc.ServicerContext``: ``abort`` records the code
   and details and raises, and the engine then replays them on the aio context. Admin calls
   always run on their own threads (a reload takes seconds).
3. The slot is given back when the call's task ends and its handler has returned.

Metrics are the sync engine's: per-method counts and durations, calls in flight, the
``queue`` stage (admitted to handler start) and shed calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent import futures
from typing import Any

import grpc

from slimrank.serving.admission import (
    Admission,
    HeldUpCalls,
    LoadMemory,
    OfferedRate,
    Refusal,
    StandingQueue,
    Ticket,
    is_stall,
)
from slimrank.serving.core_queue import CoreQueue
from slimrank.serving.decoding import Malformed, lenient, malformed_message
from slimrank.serving.metrics import ServingMetrics
from slimrank.serving.status import refusal_metadata

log = logging.getLogger(__name__)

RECOMMENDER_PREFIX = "/slimrank.v1.Recommender/"
QUEUE_PREFIX = "/slimrank.v1."
HEALTH_PREFIX = "/grpc.health.v1.Health/"
BATCH_METHOD = RECOMMENDER_PREFIX + "RecommendBatch"
IDLE_S = 0.001  # a pause this long between two calls ends a busy spell
DRAINING_MESSAGE = "server shutting down: retry, preferably on another replica"


# -- the event loop thread ----------------------------------------------------------------


class LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str = "slimrank-aio") -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name=name, daemon=True)
        self.thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        self.loop.run_forever()

    def run(self, coro: Awaitable[Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the loop and return its result (call from another thread)."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("LoopThread.run called from the loop's own thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def submit(self, coro: Awaitable[Any]) -> futures.Future:
        """Schedule ``coro`` on the loop; return a concurrent future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]


_loop_lock = threading.Lock()
_loop_thread: LoopThread | None = None


def loop_thread() -> LoopThread:
    """Return this process's event loop thread, started on first use."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is None:
            _loop_thread = LoopThread()
        return _loop_thread


def stop_loop_thread(timeout: float = 5.0) -> None:
    """Stop this process's event loop thread (if started) and wait for it; call at exit.

    grpc.aio closes its completion queue's socket when its last server is released, on
    whichever thread releases it; with the loop still polling that socket on its own thread,
    the loop's reader then failed with "Bad file descriptor" (at about one exit in three of
    ``--workers`` processes). With the loop stopped first, nothing polls it. Not for a
    process that serves again afterwards: grpc.aio stays bound to the first loop it used.
    """
    global _loop_thread
    with _loop_lock:
        thread, _loop_thread = _loop_thread, None
    if thread is None:
        return
    thread.loop.call_soon_threadsafe(thread.loop.stop)
    thread.thread.join(timeout)


# -- sync handlers under aio --------------------------------------------------------------


class HandlerAborted(Exception):
    """Raised by :meth:`SyncContext.abort`, as ``grpc.ServicerContext.abort`` raises."""


class SyncContext:
    """A ``grpc.ServicerContext`` for a sync handler that the aio engine runs.

    Reads (deadline, metadata, peer) go to the call's aio context; ``abort``, ``set_code``,
    ``set_details`` and ``set_trailing_metadata`` are recorded here and applied by the engine
    once the handler returns, so the handler may run on any thread.
    """

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[tuple[str, str | bytes], ...] | None = None
        self.aborted = False
        self.callbacks: list[Callable[[], None]] = []

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details, self.aborted = code, details, True
        raise HandlerAborted(details)

    def abort_with_status(self, status: grpc.Status) -> None:
        if status.trailing_metadata:
            self.set_trailing_metadata(status.trailing_metadata)
        self.abort(status.code, status.details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...] | None:
        return self._trailing

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._context.peer()

    def peer_identities(self) -> Any:
        return self._context.peer_identities()

    def peer_identity_key(self) -> Any:
        return self._context.peer_identity_key()

    def auth_context(self) -> Any:
        return self._context.auth_context()

    def is_active(self) -> bool:
        return not (self._context.done() or self._context.cancelled())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True


async def replay(
    context: grpc.aio.ServicerContext,
    adapter: SyncContext,
    response: Any,
    error: BaseException | None,
) -> Any:
    """Answer the call as the sync handler did: its abort, its exception or its response."""
    trailing = adapter.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(trailing)
    if adapter.aborted:
        await context.abort(adapter.code() or grpc.StatusCode.UNKNOWN, adapter.details() or "")
    if error is not None:
        # What the sync server does with an exception a handler lets through.
        await context.abort(grpc.StatusCode.UNKNOWN, f"Exception calling application: {error}")
    code = adapter.code()
    if code is not None and code is not grpc.StatusCode.OK:
        context.set_code(code)
        context.set_details(adapter.details() or "")
    return response


# -- the interceptor ------------------------------------------------------------------------

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class ServingInterceptor(grpc.aio.ServerInterceptor):
    """Admission, metrics, the sync interceptors and the sync-handler adapter, for grpc.aio.

    ``interceptors`` are sync ``grpc.ServerInterceptor`` objects (e.g. the admin-token check);
    they run on the loop, in order, as they would on the sync server's polling thread.
    Recommender calls run inline (``handler_pool`` None) or on ``handler_pool``, except
    ``RecommendBatch``, which runs on ``batch_pool`` when there is no handler pool; other sync
    handlers on ``other_pool``.
    """

    def __init__(
        self,
        metrics: ServingMetrics,
        admission: Admission,
        interceptors: Sequence[grpc.ServerInterceptor],
        handler_pool: futures.Executor | None,
        other_pool: futures.Executor,
        retry_after_s: float = 0.05,
        core_queue: CoreQueue | None = None,
        batch_pool: futures.Executor | None = None,
    ) -> None:
        self._metrics = metrics
        # Calls waiting in gRPC's core count as ahead of a new one (set once the server exists).
        self.core_queue = core_queue
        self._held = 0  # calls taken from gRPC's core and not finished (loop thread only)
        self._taken = 0
        self._idle_since = time.perf_counter()  # when _held last fell to 0
        self._busy_since = self._idle_since  # when the current busy spell began
        self._queue = StandingQueue(
            admission.burst_wait_s, admission.burst_recovery_s, self._idle_since
        )
        self._last_take: float | None = None  # when the previous call, if accepted, was taken
        self._last_model_take: float | None = None  # the last accepted one-request model call
        # Which calls (counted in _taken) the last stall seen held up.
        self._held_up = HeldUpCalls()
        self._offered = OfferedRate()  # model calls offered per second, refused ones too
        self._high_load = LoadMemory(admission.overload_fraction, admission.burst_recovery_s)
        self._admission = admission
        self._interceptors = tuple(interceptors)
        self._handler_pool = handler_pool
        self._other_pool = other_pool
        self._batch_pool = batch_pool
        message = (
            "server busy: refused on arrival so that accepted calls stay fast; "
            "retry with backoff, preferably on another replica"
        )
        self._refusal_message = message
        self._refusal_trailers = refusal_metadata(message, retry_after_s)

    def _sync_chain(
        self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        def step(i: int, call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            if i == len(self._interceptors):
                return handler
            return self._interceptors[i].intercept_service(lambda d: step(i + 1, d), call_details)

        return step(0, details)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        accepted = time.perf_counter()
        task = asyncio.current_task()
        core_queue = self.core_queue
        if self._held == 0 and accepted - self._idle_since >= IDLE_S:
            # A pause before this call: a new busy spell begins, and no queue stands.
            self._busy_since = accepted
            self._queue.empty(accepted)
        if (
            core_queue is not None
            and core_queue.last_waiting > 0
            and self._last_take is not None
            and self._last_take >= self._busy_since
        ):
            # Calls were waiting when the previous one, an accepted model call, was taken, and
            # the server has not paused since: this one came as soon as the server could take
            # it, so the interval is what an accepted call holds up the ones queued behind it.
            # (Refusals take far less; counting them would let the queue grow with calls that
            # are then accepted. A pause means the wait the count showed was not there: on the
            # 1M bundle at 100 calls/s such idle intervals made a call cost 10 ms, not 4.5.)
            core_queue.observe_take(accepted - self._last_take, self._admission.per_call_s)
        self._last_take = None  # set again below if this call is an accepted model call
        self._taken += 1
        if task is not None:  # always under grpc.aio: the call's own task
            self._held += 1
            task.add_done_callback(self._finished)
        handler = await continuation(handler_call_details)  # a lookup: does not suspend
        if handler is None:
            return None  # UNIMPLEMENTED
        method = handler_call_details.method
        if handler.request_streaming or handler.response_streaming:
            return self._sync_chain(handler, handler_call_details)  # health Watch, reflection
        if self._admission.draining and not method.startswith(HEALTH_PREFIX):
            # Shutting down: refused by this code, UNAVAILABLE, rather than left for gRPC's
            # core, which cancels a call that races its stop (CANCELLED is not retried).
            self._metrics.requests.labels(method, "UNAVAILABLE").inc()
            return grpc.stream_unary_rpc_method_handler(self._refuse_draining)
        limited = method.startswith(RECOMMENDER_PREFIX)
        ticket: Ticket | None = None
        # Health checks are answered on the loop and never refused: a refused probe could get
        # an overloaded server restarted.
        if not method.startswith(HEALTH_PREFIX):
            queued, take_interval, standing, stall = 0, None, None, None
            in_stall_tail = False
            if limited and core_queue is not None:
                idle = accepted - self._idle_since if self._held == 1 else 0.0
                busy = accepted - self._busy_since
                take_interval = core_queue.take_interval()
                self._notice_stall(accepted, take_interval)
                stall, fresh = self._stall_for_this_call(accepted)
                in_stall_tail = stall > 0.0
                queued = core_queue.waiting(self._held, self._taken, idle, busy, fresh)
                if fresh:  # the calls queued now are among those the stall held up
                    self._held_up.counted(accepted, self._taken + queued)
                stall = self._held_up.allowance(self._taken, stall)
                # Nothing waits ahead of this call: none in gRPC's core and, with handler
                # threads, a thread free (a call on the loop runs as soon as it is taken).
                admission = self._admission
                if queued == 0 and (
                    self._handler_pool is None or admission.limited_in_progress < admission.parallel
                ):
                    self._queue.empty(accepted)
                standing = self._queue.standing(accepted)
            load = self._load(accepted, take_interval, in_stall_tail) if limited else None
            ticket = self._admission.enter(limited, queued, take_interval, standing, stall, load)
            if isinstance(ticket, Refusal):
                self._metrics.refused(ticket)
                self._metrics.requests.labels(method, "RESOURCE_EXHAUSTED").inc()
                return grpc.stream_unary_rpc_method_handler(self._refuse)
            if task is None:  # not expected under grpc.aio; never leak the slot
                ticket.release()
            else:
                task.add_done_callback(ticket.release)
            if limited:
                self._last_take = accepted
                self._last_model_take = None if method == BATCH_METHOD else accepted
        handler = self._sync_chain(handler, handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        pool = self._handler_pool if limited else self._other_pool
        if pool is None and method == BATCH_METHOD and self._batch_pool is not None:
            # On the loop a batch would hold every call behind it for all its requests (an
            # independent client measured online p99 at 256 ms beside one batch client); on
            # its thread the loop keeps taking and answering calls between the GIL's turns,
            # and batches wait for one another there, not Admin calls on other_pool.
            pool = self._batch_pool
        return grpc.unary_unary_rpc_method_handler(
            self._behavior(handler.unary_unary, method, accepted, ticket, pool),
            request_deserializer=lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _load(self, now: float, take_interval: float | None, in_stall_tail: bool) -> float:
        """The share of the server's capacity that the model calls offered of late take: their
        rate (this one counted) times what one costs (the measured time between two calls
        taken from a queue, else a handler's mean time over the handlers); at least the
        overload fraction for ``burst_recovery_s`` after it reached it (:class:`LoadMemory`).
        In a stall's tail the rate is the one read before the stall (:class:`OfferedRate`)."""
        cost = take_interval or self._admission.per_call_s
        load = self._offered.note(now, hold=in_stall_tail) * cost
        self._metrics.offered_load.set(load)
        return self._high_load.load(now, load)

    def _notice_stall(self, now: float, take_interval: float | None) -> None:
        """Tell admission when the server stood still before ``now``.

        Two one-request model calls taken ``gap`` apart within one busy spell, where calls
        are usually taken every ``usual`` (``take_interval`` or a handler's mean time),
        with ``gap`` a stall (``is_stall``: over 50 ms and 4x ``usual``): the loop was held
        (the machine froze the process, as this 2-core VM does for 0.08-0.7 s at times; a
        long garbage collection). The calls that queued meanwhile came no faster than the
        server works, and they have waited ``gap`` already: they may wait up to ``gap``
        (:meth:`_stall_for_this_call`), so that queue is worked off instead of refused
        (refused, the calls failed as late as they would have been answered).
        Counted in ``slimrank_stalls_total`` unless the freeze watch already counted it.
        Under overload the intervals are the usual ones and nothing is noticed; a lasting
        slow-down raises ``usual`` within a few dozen calls. A batch's long handler is real
        work: the call after one is not compared.
        """
        admission = self._admission
        last, loading = self._last_model_take, admission.loading
        if last is None or last < self._busy_since or loading is None:
            return
        # A handler's mean time as well: two calls can be taken back to back before either
        # runs, so the take interval alone can be far below what a call holds the loop.
        usual = max(take_interval or 0.0, admission.per_call_s)
        gap = now - last
        if is_stall(gap, usual) and loading.stalled(gap):
            self._metrics.stalls.inc()

    def _stall_for_this_call(self, now: float) -> tuple[float, bool]:
        """How long the server stood still before the call taken at ``now`` (0.0 if it did
        not, or that is over) and whether to read the core's queue afresh: the calls in it
        are among those the stall held up (:class:`HeldUpCalls`; the caller counts them and
        cuts the allowance to them)."""
        loading = self._admission.loading
        if loading is None:
            return 0.0, False
        stall, mark = loading.stall()
        if stall == 0.0:
            return 0.0, False
        return stall, self._held_up.needs_read(now, mark)

    def _finished(self, _: object) -> None:
        self._held -= 1
        if self._held == 0:
            self._idle_since = time.perf_counter()

    async def _refuse(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        # A stream-unary handler starts without reading the request, so the refusal goes out
        # in the same loop step as the admission check.
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            self._refusal_message,
            trailing_metadata=self._refusal_trailers,
        )

    async def _refuse_draining(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)

    def _behavior(
        self,
        inner: Callable[..., Any],
        method: str,
        accepted: float,
        ticket: Ticket | None,
        pool: futures.Executor | None,
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        metrics = self._metrics
        admission = self._admission
        limited = method.startswith(RECOMMENDER_PREFIX)
        # A batch's handler time is many calls' time: it would inflate the one-call estimate.
        observe = limited and method != BATCH_METHOD
        record_queue = method.startswith(QUEUE_PREFIX)
        is_async = inspect.iscoroutinefunction(inner)

        def run(request: Any, adapter: SyncContext, once: threading.Lock) -> tuple[Any, Any]:
            """Run the sync handler and count its outcome (on whichever thread runs it)."""
            start = time.perf_counter()
            if record_queue:
                metrics.stage_duration.labels("queue").observe(start - accepted)
            left = adapter.time_remaining()
            if left is not None and left <= 0:  # expired while it waited: do no work for it
                with contextlib.suppress(HandlerAborted):
                    adapter.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed in the queue")
                count(once, grpc.StatusCode.DEADLINE_EXCEEDED, start)
                return None, None
            metrics.inflight.inc()
            error: BaseException | None = None
            try:
                response = inner(request, adapter)
            except Exception as raised:  # replayed on the aio context
                response, error = None, None if adapter.aborted else raised
            finally:
                metrics.inflight.dec()
                if observe:
                    admission.observe(time.perf_counter() - start)
            code = adapter.code() or (
                grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
            )
            count(once, code, start)
            return response, error

        def count(once: threading.Lock, code: grpc.StatusCode, start: float) -> None:
            if once.acquire(blocking=False):  # each call is counted once
                metrics.request_duration.labels(method).observe(time.perf_counter() - start)
                metrics.requests.labels(method, code.name).inc()

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            once = threading.Lock()
            if isinstance(request, Malformed):
                count(once, grpc.StatusCode.INVALID_ARGUMENT, start)
                message = malformed_message(method, request, context.peer())
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            if is_async:
                if record_queue:
                    metrics.stage_duration.labels("queue").observe(start - accepted)
                metrics.inflight.inc()
                try:
                    response = await inner(request, context)
                    count(once, context.code() or grpc.StatusCode.OK, start)
                    return response
                except asyncio.CancelledError:
                    count(once, _cancelled_code(context), start)
                    raise
                except Exception:  # AbortError included: grpc answers with the code set
                    count(once, context.code() or grpc.StatusCode.UNKNOWN, start)
                    raise
                finally:
                    metrics.inflight.dec()
            adapter = SyncContext(context)
            if pool is None:
                response, error = run(request, adapter, once)
            else:
                future = pool.submit(run, request, adapter, once)
                if ticket is not None:  # given back when the thread is done with it
                    ticket.hold()
                    future.add_done_callback(ticket.release)
                # Shielded: a call cancelled meanwhile still lets its handler finish and count.
                response, error = await asyncio.shield(asyncio.wrap_future(future))
            for callback in adapter.callbacks:
                callback()
            if error is not None:
                log.error("%s failed", method, exc_info=error)
            return await replay(context, adapter, response, error)

        return behavior


def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    left = context.time_remaining()
    return (
        grpc.StatusCode.DEADLINE_EXCEEDED
        if left is not None and left <= 0
        else (grpc.StatusCode.CANCELLED)
    )
