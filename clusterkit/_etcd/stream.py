"""One bidirectional gRPC stream (Watch, LeaseKeepAlive) on a bridge's loop, fed from Trio.

Theory of operation
-------------------
A stream is two tasks on its :class:`~clusterkit._etcd.bridge.AioBridge`'s loop: a writer that
sends what Trio queued (through the bridge's batched inbox) and a reader that posts each
response to Trio (through the batched outbox). No thread per stream, so the thread count does
not grow with watches or leases.

Flow control is a credit count: the reader stops reading when the Trio side holds ``credits``
unconsumed responses and resumes when they are released, so a slow consumer slows etcd down
instead of growing memory. The count is two monotonic counters, each written by one thread
only (consumed by the loop, released by Trio), so no lock is needed; the reader marks itself
starved and re-checks before it sleeps, and a release wakes it only then. Closing cancels the
call and the tasks (a reader waiting for credits included) and waits, from Trio, for the end
the reader posts.

A *loop tap* (optional) sees the stream on the loop thread: ``tap.sent(request)`` for every
request Trio queued, in the order they are written, and ``tap.received(response)`` for every
response before it is posted; a tap that returns True has consumed the response on the loop
(it is neither posted to Trio nor counted against the credits). Together with
:meth:`BidiStream.loop_send` (requests that originate on the loop) this lets loop-side code
(the keepalive pump, lease.py) share the stream with Trio callers without a Trio hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any, Protocol

import grpc.aio
import trio

from .bridge import AioBridge, LocalCancellation
from .channel import Endpoint

_CREDITS = 16384  # responses in flight per stream (QUEUE_LIMIT per watch is lower)
_STOP_TIMEOUT = 10.0


class LoopTap(Protocol):
    """Loop-thread observer of a stream (see the module docstring). Must not raise."""

    def sent(self, request: Any) -> None: ...

    def received(self, response: Any) -> bool: ...


class BidiStream:
    """One bidirectional gRPC stream on the bridge's loop, fed from and read into Trio.

    ``on_response(message)`` and ``on_error(exc)`` run in the Trio thread and must not raise;
    exceptions they raise are swallowed after being handed to ``on_error``. ``on_error`` is
    called at most once, with the ``grpc.RpcError`` (or other exception) that ended the stream,
    or ``None`` when the stream was closed by us. The consumer calls :meth:`release` once for
    every response it has finished with.
    """

    def __init__(
        self,
        bridge: AioBridge,
        endpoint: Endpoint,
        service: str,
        method: str,
        *,
        lane: str = "main",
        metadata: tuple[tuple[str, str], ...],
        on_response: Callable[[Any], None],
        on_error: Callable[[BaseException | None], None],
        credits: int = _CREDITS,
        loop_tap: LoopTap | None = None,
    ) -> None:
        self._bridge = bridge
        self._endpoint = endpoint
        self._service = service
        self._method = method
        self._lane = lane
        self._urgent = lane == "lease"
        self._metadata = metadata
        self._on_response = on_response
        self._on_error = on_error
        self._credits = credits
        self.loop_tap = loop_tap
        self._released = 0  # written by Trio only
        self._consumed = 0  # written by the loop only
        self._starved = False  # loop: waiting for credits
        self._closing = False
        self._error_reported = False
        self._finished = trio.Event()
        # Loop-side state.
        self._call: Any = None
        self._writes: asyncio.Queue[Any] | None = None
        self._credit_event: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        bridge.submit(self._open, urgent=self._urgent)

    @property
    def closed(self) -> bool:
        """True once the stream has ended, by error or by :meth:`aclose`."""
        return self._closing or self._error_reported

    def send(self, request: Any) -> None:
        """Queue a request for the stream (never blocks)."""
        if self.closed:
            return
        self._bridge.submit(lambda: self._enqueue(request), urgent=self._urgent)

    def release(self, n: int = 1) -> None:
        """Give back ``n`` credits after consuming ``n`` responses."""
        self._released += n
        if self._starved and not self._closing:
            self._bridge.submit(self._unstarve, urgent=self._urgent)

    # -- loop thread ----------------------------------------------------------------------

    def loop_send(self, request: Any) -> bool:
        """Queue a request from the loop thread; False if the stream is not open on the loop.

        Loop thread only. Requests queued by :meth:`send` and by this method are written in
        the order they reach the loop.
        """
        if self._writes is None or self._call is None or self.closed:
            return False
        self._writes.put_nowait(request)
        return True

    def _open(self) -> None:
        # Sends are submitted after this on the same lane, so they find the queue.
        self._writes = asyncio.Queue()
        self._credit_event = asyncio.Event()
        if self._closing:
            self._post_end(None)
            return
        loop = asyncio.get_running_loop()
        try:
            stub = getattr(self._bridge.stubs(self._endpoint, self._lane), self._service)
            self._call = getattr(stub, self._method)(metadata=self._metadata)
        except Exception as exc:
            self._post_end(exc)
            return
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._write())]

    def _enqueue(self, request: Any) -> None:
        if self._writes is not None:  # None: the stream has ended
            self._writes.put_nowait(request)
            if self.loop_tap is not None:
                self.loop_tap.sent(request)

    def _unstarve(self) -> None:
        if self._credit_event is not None:
            self._credit_event.set()

    async def _write(self) -> None:
        assert self._writes is not None
        with contextlib.suppress(Exception):  # the reader reports how the stream ended
            while True:
                request = await self._writes.get()
                await self._call.write(request)

    async def _read(self) -> None:
        assert self._credit_event is not None
        error: BaseException | None = None
        try:
            while True:
                while self._consumed - self._released >= self._credits:
                    self._starved = True
                    self._credit_event.clear()
                    if self._consumed - self._released < self._credits:
                        break  # a release came in between
                    await self._credit_event.wait()
                self._starved = False
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    error = EOFError("stream ended")
                    break
                if self.loop_tap is not None and self.loop_tap.received(response):
                    continue
                self._consumed += 1
                self._bridge.post(functools.partial(self._deliver, response), urgent=self._urgent)
        except asyncio.CancelledError:
            error = None if self._closing else LocalCancellation("the etcd client is closed")
        except Exception as exc:
            error = exc
        finally:
            for t in self._tasks:
                if t is not asyncio.current_task():
                    t.cancel()
            if self._call is not None:
                self._call.cancel()
            # Drop the call: gRPC's poller thread lives as long as some call or channel does.
            self._call, self._tasks, self._writes = None, [], None
            self._post_end(error)

    def _post_end(self, error: BaseException | None) -> None:
        self._bridge.post(lambda: self._end(error), urgent=self._urgent)

    def _close_on_loop(self) -> None:
        # The reader (reading, or waiting for credits) sees CancelledError and posts the end.
        # Without a call, either _open has not run yet (it will see _closing and post the end)
        # or it failed and posted it.
        if self._call is not None:
            self._call.cancel()
            for task in self._tasks:
                task.cancel()

    # -- Trio thread ----------------------------------------------------------------------

    def _deliver(self, response: Any) -> None:
        if self._closing or self._error_reported:
            return
        try:
            self._on_response(response)
        except BaseException as exc:
            self._report(exc)
            self._closing = True
            self._bridge.submit(self._close_on_loop, urgent=True)

    def _end(self, error: BaseException | None) -> None:
        if self._closing:
            self._report(None)
        else:
            self._report(error if error is not None else EOFError("stream ended"))
        self._finished.set()

    def _report(self, error: BaseException | None) -> None:
        if self._error_reported:
            return
        self._error_reported = True
        with contextlib.suppress(BaseException):
            self._on_error(error)

    async def aclose(self) -> None:
        """Cancel the call and wait until its loop tasks have finished."""
        if not self._closing:
            self._closing = True
            if not self._finished.is_set():
                self._bridge.submit(self._close_on_loop, urgent=True)
        if self._bridge.closed:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(_STOP_TIMEOUT):
            await self._finished.wait()
