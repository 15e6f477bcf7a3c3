"""The Trio <-> gRPC bridge: grpc.aio on one asyncio loop in one thread, woken in batches.

Theory of operation
-------------------
grpcio's asyncio API (``grpc.aio``) is its cheapest per call: completions are polled by one C
thread and handled on the loop, with no Python thread per channel and no condition variables
per call. It needs an asyncio loop, and Trio has none, so each :class:`AioBridge` runs one
private loop in one dedicated thread (started on first use, stopped by :meth:`AioBridge.aclose`)
and everything gRPC happens on that loop: channels, unary calls, the streams' read and write
tasks. The Trio side never touches a gRPC object.

The two threads talk through two queues, each with ONE wakeup per batch, not per call:

- Trio -> loop: :meth:`AioBridge.submit` appends a callable to the inbox and, only if no drain
  is pending, schedules one with ``call_soon_threadsafe``. A drain clears its flag *before*
  emptying the inbox, so an item appended meanwhile is either drained now or has scheduled its
  own drain. 100 calls started in one Trio tick cost one self-pipe write.
- loop -> Trio: :meth:`AioBridge.post` does the same with the outbox and the Trio token's
  ``run_sync_soon``: a burst of completions wakes Trio once.

Both queues have an urgent lane that is drained first (cancellations, and the lease lane).
The etcd client runs one bridge, for lease calls and the keepalive stream, whose channel is a
connection of its own: its other calls and the watch stream run in the Trio thread (http2.py).
The node's gRPC server and channels run on another (clusterkit._grpc). gRPC's poller thread
signals each completion with one byte on a socket that every loop with a channel watches.

Unary calls (:meth:`AioBridge.unary`): the Trio task parks in ``wait_task_rescheduled``; the
loop starts the call on our generated stub and a done-callback posts its outcome (no asyncio
task of our own per call). The last call in flight wakes Trio at once; while others are in
flight, the wakeup waits for the end of the loop's iteration so the completions it handles
share it. If the Trio task is cancelled, the abort function submits the call's cancellation
(urgent), which cancels the RPC itself (grpc.aio sends RST_STREAM), so nothing runs on to its
deadline; ``statistics()["rpc_cancelled"]`` counts them. Every call also has a gRPC deadline.
A call's gRPC objects are dropped as soon as it ends: gRPC's one poller thread per process
lives exactly as long as some channel or call object does, so closing the last client ends it.

Streams run on the same loop (stream.py): tasks, not threads. Callbacks that run in Trio
through ``run_sync_soon`` must never raise (it would kill the Trio run), so they are wrapped.

:func:`call_unary` is the previous bridge, kept for synchronous stubs where no bridge exists
(the embedded etcd's readiness probe): ``.future()`` woken through the Trio token. It costs
more CPU per call under concurrency (see benchmarks/etcd_bridge.py).

Measured against the alternatives (benchmarks/etcd_bridge.py and the report of issue 10): per
concurrent call this costs about the CPU of the asyncio clients that use grpc.aio directly,
and 30-40% less than the sync ``.future()`` bridge; trio-asyncio (the same loop in the Trio
thread) cost twice as much. A lone call pays for its wakeups: Trio -> loop, gRPC's poller ->
loop, loop -> Trio, where a blocking call has its own thread woken once by the network. Each
wakeup costs 50-150 us on a small VM (traced, p50 of a lone get: 45-75 us to reach the loop,
135-160 us back to Trio), so a lone call is about 1.4-1.7x a blocking one there; asyncio
clients on grpc.aio, with one hop fewer, measure 1.15-1.3x. That is why the etcd client's
unary calls and its watch stream now run in the Trio thread (http2.py), with no hop at all;
the lease lane stays here, where its keepalives are sent by the loop itself even while the
Trio thread is starved (lease.py's pump).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
import outcome
import trio

from .._errors import EtcdUnavailable
from .channel import Endpoint, Stubs
from .h2wire import RpcError

_STOP_TIMEOUT = 10.0
_log = logging.getLogger("clusterkit")


class LocalCancellation(RpcError):
    """An RPC ended because the bridge or its channel was closed under it (CANCELLED)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.CANCELLED, details)


class AioBridge:
    """One asyncio loop in one thread that runs every gRPC call of one client.

    Create it in the Trio thread; it binds to the Trio run on first use. Not thread-safe on the
    Trio side (one Trio run owns it).
    """

    def __init__(self, name: str = "etcd") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._inbox: deque[Callable[[], object]] = deque()
        self._urgent_in: deque[Callable[[], object]] = deque()
        self._in_armed = False
        self._outbox: deque[Callable[[], object]] = deque()
        self._urgent_out: deque[Callable[[], object]] = deque()
        self._out_armed = False
        self._closed = False
        self._stopped = trio.Event()
        self._stubs: dict[tuple[str, str], Stubs] = {}
        # Counters, each written by one thread.
        self.started = 0  # unary calls started (loop)
        self.finished = 0  # unary calls that ended, however (loop)
        self.cancelled = 0  # RPCs cancelled in gRPC because their Trio task was (loop)
        self.wakeups = 0  # batches delivered to Trio (Trio)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._thread else "idle")
        return f"<AioBridge {self._name} {state} in_flight={self.started - self.finished}>"

    def statistics(self) -> dict[str, int]:
        """Counters: unary RPCs started, in flight, cancelled in gRPC; Trio wakeups."""
        return {
            "rpc_started": self.started,
            "rpc_in_flight": self.started - self.finished,
            "rpc_cancelled": self.cancelled,
            "bridge_wakeups": self.wakeups,
        }

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the two queues -----------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    def _start(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        if self._loop is None:
            self._token = trio.lowlevel.current_trio_token()
            self._loop = asyncio.new_event_loop()
            self._loop.set_exception_handler(_loop_exception)
            self._thread = threading.Thread(
                target=self._run_loop, name=f"clusterkit-{self._name}-aio", daemon=True
            )
            self._thread.start()
        return self._loop

    def _run_loop(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(BaseException):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            asyncio.set_event_loop(None)
            self._post_final()

    @trio.lowlevel.enable_ki_protection
    def submit(self, fn: Callable[[], object], *, urgent: bool = False) -> None:
        """Run ``fn()`` on the loop soon (from the Trio thread; never blocks, never raises).

        After :meth:`aclose` nothing is run: the loop's shutdown has cancelled everything.
        """
        if self._closed:
            return
        loop = self._start()
        (self._urgent_in if urgent else self._inbox).append(fn)
        if not self._in_armed:
            self._in_armed = True
            try:
                loop.call_soon_threadsafe(self._drain_inbox)
            except RuntimeError:  # the loop has stopped: nothing will run
                self._in_armed = False

    def _drain_inbox(self) -> None:
        self._in_armed = False
        urgent, inbox = self._urgent_in, self._inbox
        while urgent or inbox:
            fn = urgent.popleft() if urgent else inbox.popleft()
            try:
                fn()
            except Exception as exc:  # pragma: no cover - our callables do not raise
                self._loop_error(exc)

    def post(self, fn: Callable[[], object], *, urgent: bool = False, now: bool = False) -> None:
        """Run ``fn()`` in the Trio thread soon (from the loop thread; never blocks).

        Trio is woken at the end of the loop's current iteration, so every completion that
        iteration handles shares one wakeup; urgent items, and ``now``, wake it at once.
        """
        (self._urgent_out if urgent else self._outbox).append(fn)
        if not self._out_armed:
            self._out_armed = True
            if urgent or now or self._loop is None or self._loop.is_closed():
                self._wake_trio()
            else:
                self._loop.call_soon(self._wake_trio)

    def _wake_trio(self) -> None:
        assert self._token is not None
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._drain_outbox)

    def _drain_outbox(self) -> None:
        self._out_armed = False
        self.wakeups += 1
        urgent, outbox = self._urgent_out, self._outbox
        while urgent or outbox:
            fn = urgent.popleft() if urgent else outbox.popleft()
            # An exception here would kill the Trio run: every posted callable is guarded.
            with contextlib.suppress(Exception):
                fn()

    def _loop_error(self, exc: BaseException) -> None:  # pragma: no cover - defensive
        loop = self._loop
        if loop is not None:
            loop.call_exception_handler({"message": "clusterkit bridge", "exception": exc})

    # -- channels (loop thread) ---------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    def stubs(self, endpoint: Endpoint, lane: str) -> Stubs:
        """The stubs on ``endpoint``'s channel for ``lane`` (``"main"`` or ``"lease"``).

        Loop thread only: the channel is created on first use, on the loop.
        """
        key = (endpoint.target, lane)
        stubs = self._stubs.get(key)
        if stubs is None:
            stubs = self._stubs[key] = Stubs(endpoint.open_aio_channel())
        return stubs

    # -- unary calls ----------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def unary(
        self,
        endpoint: Endpoint,
        service: str,
        method: str,
        request: Any,
        *,
        timeout: float,
        metadata: tuple[tuple[str, str], ...] | None = None,
        lane: str = "main",
    ) -> Any:
        """Run one unary RPC on the loop and wait for it without blocking Trio.

        Args:
            endpoint: the endpoint to call.
            service: the stub (``"kv"``, ``"lease"``, ... ; see :class:`Stubs`).
            method: the stub's method (``"Range"``).
            request: the request message.
            timeout: the gRPC deadline in seconds.
            metadata: gRPC metadata to send.
            lane: ``"main"``, or ``"lease"`` for the urgent lane and its own connection.

        Returns:
            The response message.

        Raises:
            EtcdUnavailable: the bridge is closed.
            grpc.RpcError: the call failed (the caller translates it).
            trio.Cancelled: the Trio task was cancelled; the RPC has been cancelled too,
                unless it had already completed (a write may then have been applied: as with
                any timeout, the outcome of a cancelled write is unknown).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        call = _UnaryCall(self, endpoint, lane, service, method, request, timeout, metadata)
        self.submit(call.start, urgent=lane == "lease")
        return await trio.lowlevel.wait_task_rescheduled(call.abort)

    # -- shutdown -------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def aclose(self) -> None:
        """Close every channel (cancelling what runs on them), stop the loop, join the thread."""
        if self._closed:
            return
        self._closed = True
        if self._loop is None:
            return
        loop = self._loop
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: loop.create_task(self._shutdown()))
        assert self._stopped is not None
        with trio.CancelScope(shield=True), trio.move_on_after(_STOP_TIMEOUT):
            await self._stopped.wait()
            assert self._thread is not None
            self._thread.join(timeout=1.0)

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        stubs, self._stubs = list(self._stubs.values()), {}
        for s in stubs:
            with contextlib.suppress(Exception):
                await s.channel.close()
        me = asyncio.current_task()
        for _ in range(10):  # done-callbacks may start error tasks: until nothing is left
            rest = [t for t in asyncio.all_tasks(loop) if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            await asyncio.sleep(0)  # let the callbacks of what just ended run
            if not rest:
                break
        loop.stop()

    def _post_final(self) -> None:
        def done() -> None:
            assert self._stopped is not None
            self._stopped.set()

        self.post(done, urgent=True)


class _UnaryCall:
    """One unary RPC: started and (maybe) cancelled on the loop, woken in Trio.

    On the loop the call needs no task of its own: a done-callback on grpc.aio's response
    task delivers the answer. Only a failed call (whose error grpc.aio builds while awaited)
    is awaited in a task, as is every call if that response task is not there (a grpc.aio
    whose internals differ).
    """

    __slots__ = (
        "bridge",
        "call",
        "endpoint",
        "lane",
        "metadata",
        "method",
        "request",
        "service",
        "timeout",
        "trio_task",
        "waiting",
        "withdrawn",
    )

    def __init__(
        self,
        bridge: AioBridge,
        endpoint: Endpoint,
        lane: str,
        service: str,
        method: str,
        request: Any,
        timeout: float,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> None:
        self.bridge = bridge
        self.endpoint = endpoint
        self.lane = lane
        self.service = service
        self.method = method
        self.request = request
        self.timeout = timeout
        self.metadata = metadata
        self.trio_task = trio.lowlevel.current_task()
        self.waiting = True  # Trio side: still parked
        self.withdrawn = False  # loop side: the Trio task gave up
        self.call: Any = None

    # Loop thread.
    def start(self) -> None:
        if self.withdrawn:
            return
        bridge = self.bridge
        bridge.started += 1
        try:
            stub = getattr(bridge.stubs(self.endpoint, self.lane), self.service)
            call = self.call = getattr(stub, self.method)(
                self.request, timeout=self.timeout, metadata=self.metadata
            )
        except Exception as exc:
            self._finish(outcome.Error(exc))
            return
        response_task = getattr(call, "_call_response", None)
        if isinstance(response_task, asyncio.Future):
            response_task.add_done_callback(self._responded)
        else:  # pragma: no cover - a grpc.aio without the response task
            asyncio.get_running_loop().create_task(self._await())

    def _responded(self, response_task: asyncio.Future[Any]) -> None:
        if response_task.cancelled() or self.withdrawn:
            self._finish(None)
            return
        error = response_task.exception()
        if error is None and response_task.result() is not grpc.aio.EOF:
            self._finish(outcome.Value(response_task.result()))
        else:  # awaiting the call raises the error grpc.aio builds from the status
            asyncio.get_running_loop().create_task(self._await())

    async def _await(self) -> None:
        try:
            result: outcome.Outcome[Any] | None = outcome.Value(await self.call)
        except asyncio.CancelledError:
            # Ours (the Trio task gave up), or the channel was closed under the call.
            result = None if self.withdrawn else outcome.Error(_closed())
        except Exception as exc:
            result = outcome.Error(exc)
        self._finish(result)

    def _finish(self, result: outcome.Outcome[Any] | None) -> None:
        self.call = None  # nothing needs it now; see BidiStream._read on gRPC's poller thread
        bridge = self.bridge
        bridge.finished += 1  # before waking Trio, so its statistics() agree
        if result is None and not self.withdrawn:
            result = outcome.Error(_closed())
        if result is not None:
            # The last call in flight wakes Trio at once: nothing else could share the wakeup.
            bridge.post(
                functools.partial(self._wake, result),
                urgent=self.lane == "lease",
                now=bridge.started == bridge.finished,
            )

    def cancel(self) -> None:
        self.withdrawn = True
        if self.call is not None and self.call.cancel():  # False: it had already ended
            self.bridge.cancelled += 1

    # Trio thread.
    def _wake(self, result: outcome.Outcome[Any]) -> None:
        if self.waiting:
            self.waiting = False
            trio.lowlevel.reschedule(self.trio_task, result)

    def abort(self, _: Any) -> trio.lowlevel.Abort:
        self.waiting = False
        self.bridge.submit(self.cancel, urgent=True)
        return trio.lowlevel.Abort.SUCCEEDED


def _closed() -> LocalCancellation:
    return LocalCancellation("the etcd client is closed")


@trio.lowlevel.enable_ki_protection
async def call_unary(
    method: Any,
    request: Any,
    *,
    timeout: float,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> Any:
    """Run one unary RPC of a *synchronous* stub without blocking Trio and without a thread.

    For the few calls that have no :class:`AioBridge` (the embedded etcd's readiness probe):
    the stub's ``.future()`` runs the RPC and its done-callback wakes the task through the Trio
    token; a cancelled task cancels the future.

    Args:
        method: a unary-unary multicallable of a generated stub (``stub.Range``).
        request: the request message.
        timeout: the gRPC deadline in seconds.
        metadata: gRPC metadata to send.

    Returns:
        The response message.

    Raises:
        grpc.RpcError: the call failed (the caller translates it).
        trio.Cancelled: the Trio task was cancelled; the RPC has been cancelled too, unless
            it had already completed (a write may then have been applied: as with any
            timeout, the outcome of a cancelled write is unknown).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()
    future = method.future(request, timeout=timeout, metadata=metadata)
    waiting = True

    def wake() -> None:
        nonlocal waiting
        if waiting:
            waiting = False
            trio.lowlevel.reschedule(task)

    def on_done(_: Any) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(wake)

    def abort(_: Any) -> trio.lowlevel.Abort:
        nonlocal waiting
        waiting = False
        future.cancel()
        return trio.lowlevel.Abort.SUCCEEDED

    future.add_done_callback(on_done)
    await trio.lowlevel.wait_task_rescheduled(abort)
    return future.result()


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's handler for errors nobody awaited, minus one of grpc.aio's at shutdown.

    gRPC's poller hands each completion to the loop its call belongs to. A completion that
    arrives after that loop was closed (a bridge that has shut down; its channels' last
    events can trail it) raises ``RuntimeError('Event loop is closed')`` inside whichever loop
    is reading, which asyncio would log as an ERROR with a traceback on every shutdown. The
    completion belonged to a finished bridge: there is nothing to do with it.
    """
    exc = context.get("exception")
    if (
        isinstance(exc, RuntimeError)
        and str(exc) == "Event loop is closed"
        and "_handle_events" in repr(context.get("handle"))
    ):
        _log.debug("clusterkit: a gRPC completion for a closed bridge was dropped")
        return
    loop.default_exception_handler(context)
