"""One authenticated peer connection: requests, one-way messages and streams over it.

Theory of operation
-------------------
Both ends of a connection run the same :class:`PeerSession` once the handshake is done.

Reading: ONE reader task decodes messages (``frames.decode_batch``) and dispatches each frame
without blocking — requests and one-way messages go to handlers (each in its own task, at most
``max_concurrent`` at a time), responses and errors to the waiting caller by request id,
stream frames to their :class:`PeerStream`. A ping every ``PING_INTERVAL`` that is not
answered within ``PING_TIMEOUT`` (a frozen or cut-off peer) fails the connection. A frame
the decoder refuses, or a peer that breaks the stream protocol (an item beyond the credit it
was given, an unknown frame kind at this stage), closes the connection with a proper close
code (1002 protocol error, 1009 too big); the node goes on. When a connection ends, every
request still waiting on it fails with :class:`PeerUnreachable`, and so does every stream.

Writing: callers append encoded frames to an outgoing queue; ONE writer task sends them.
When several frames are queued, they go as one websocket message (a ``Batch`` frame, up to
``BATCH_BYTES``; a bigger frame goes alone, uncopied), so a burst of small messages costs one
send instead of many; an idle connection sends at once.
The queue is bounded in bytes: a caller waits while it is over ``HIGH_WATER``. Stream control
frames (credit, end, abort) never wait: they are tiny, and they must go out even from a
cancelled task (leaving ``async with ck.peers.stream(...)`` early still tells the other side).

Streams: either side opens one with a ``StreamOpen`` frame; stream ids are odd for the side
that dialed and even for the side that accepted, so both can open streams at once. Each
direction has its own credit: a sender may have at most ``STREAM_WINDOW`` items unacknowledged;
the receiver grants more (``StreamCredit``) as the application *consumes* items, so a slow
consumer slows the producer instead of growing a buffer. The receiver counts the credit it has
granted, and one item beyond it is a protocol error. ``StreamEnd`` with no error ends one
direction; with an error it aborts both (the other side sees :class:`RemoteError`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

import trio
import trio_websocket

from .._errors import NotLeader, PeerUnreachable, RemoteError
from . import frames as f


class WebSocket(Protocol):
    """What a session needs of a websocket (trio-websocket's, or ``memory.py``'s)."""

    async def send_message(self, message: bytes | str) -> None: ...

    async def get_message(self) -> bytes | str: ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...

    async def ping(self, payload: bytes | None = None) -> None: ...


Handler = Callable[[Any], Awaitable[Any]]
"""A request or one-way handler: ``async def handler(payload) -> answer``."""

StreamHandler = Callable[["PeerStream", Any], Awaitable[None]]
"""A stream handler: ``async def handler(stream, payload)``; its return ends its side."""

STREAM_WINDOW = 64  # items a stream sender may have in flight before it waits for credit
HIGH_WATER = 4 * 1024 * 1024  # bytes queued for writing before senders wait
MAX_CONCURRENT = 256  # handlers running at once per connection
MAX_WAITING = 8192  # requests queued behind the running handlers before more are refused
BATCH_BYTES = 256 * 1024  # a batch message stops growing here; bigger frames go alone
CLOSE_TIMEOUT = 2.0  # seconds the websocket close handshake may take before the socket is shut
PING_INTERVAL = 5.0  # seconds between websocket pings on a connection
PING_TIMEOUT = 10.0  # a connection whose ping is not answered this long is given up


def error_frame(request_id: int, exc: BaseException) -> f.ErrorReply:
    """The error answer for a handler that raised ``exc``."""
    data = {"leader": exc.leader} if isinstance(exc, NotLeader) else None
    # The decoder refuses error types over 256 characters (and would close the connection).
    return f.ErrorReply(request_id, type(exc).__name__[:256], str(exc)[:1000], data)


class PeerStream:
    """One stream between two nodes: send items, receive items, each way with flow control.

    ``async for item in stream`` receives until the other side ends its direction;
    :meth:`send` waits while the other side has not granted credit; :meth:`end` ends this
    side's direction. Leaving ``async with ck.peers.stream(...)`` early aborts the stream.

    Raises (from send/receive):
        RemoteError: the other side aborted the stream (its handler raised).
        PeerUnreachable: the connection broke.
    """

    def __init__(self, session: PeerSession, stream_id: int, method: str) -> None:
        self._session = session
        self.id = stream_id
        self.method = method
        self.remote_id = session.remote_id
        self._credit = STREAM_WINDOW  # items we may still send
        self._allowance = STREAM_WINDOW  # items the other side may still send
        self._inbox: deque[Any] = deque()
        self._consumed = 0
        self._wakeup = trio.Event()
        self._remote_ended = False
        self._local_ended = False
        self._failure: BaseException | None = None

    def __repr__(self) -> str:
        return f"<PeerStream {self.method} #{self.id} with {self.remote_id}>"

    # -- the application's side ------------------------------------------------------------

    async def send(self, item: Any) -> None:
        """Send one item (any msgpack value); waits for credit from the receiver."""
        while True:
            if self._failure is not None:
                raise self._failure
            if self._local_ended:
                raise trio.ClosedResourceError(f"{self!r}: send after end()")
            if self._credit > 0:
                break
            await self._wait()
        self._credit -= 1
        await self._session.send_frame(f.StreamItem(self.id, item))

    async def receive(self) -> Any:
        """The next item.

        Raises:
            trio.EndOfChannel: the other side ended its direction.
        """
        while not self._inbox:
            if self._failure is not None:
                raise self._failure
            if self._remote_ended:
                raise trio.EndOfChannel
            await self._wait()
        item = self._inbox.popleft()
        self._consumed += 1
        if self._consumed >= STREAM_WINDOW // 2 and not self._remote_ended:
            credit, self._consumed = self._consumed, 0
            self._allowance += credit
            self._session.send_control(f.StreamCredit(self.id, credit))
        return item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                item = await self.receive()
            except trio.EndOfChannel:
                return
            yield item

    async def end(self) -> None:
        """End this side's direction: the other side's iteration finishes after the items
        already sent. Idempotent; never blocks."""
        if self._local_ended or self._failure is not None:
            return
        self._local_ended = True
        self._session.send_control(f.StreamEnd(self.id, None))
        self._forget_if_done()

    async def abort(self, error_type: str = "Cancelled", message: str = "stream aborted") -> None:
        """Abort both directions; the other side sees ``RemoteError(error_type, message)``.

        Never blocks, so it also works from a cancelled task (a ``finally`` block).
        """
        if self._failure is not None or (self._local_ended and self._remote_ended):
            return
        self._fail(PeerUnreachable(f"{self!r} was aborted locally"))
        error = (error_type[:256] or "Cancelled", message[:1000])
        self._session.send_control(f.StreamEnd(self.id, error))

    # -- the reader's side (synchronous, never blocks) ---------------------------------------

    def _deliver(self, item: Any) -> bool:
        """An item arrived; False if the peer broke the protocol (beyond its credit)."""
        if self._remote_ended or self._allowance <= 0:
            return False
        self._allowance -= 1
        if self._failure is None:
            self._inbox.append(item)
            self._wake()
        return True

    def _remote_end(self, error: tuple[str, str] | None) -> None:
        if error is not None:
            self._fail(RemoteError(*error))
        else:
            self._remote_ended = True
            self._wake()
            self._forget_if_done()

    def _add_credit(self, credit: int) -> None:
        self._credit = min(self._credit + credit, 2**31)
        self._wake()

    def _fail(self, failure: BaseException) -> None:
        if self._failure is None:
            self._failure = failure
        self._session.streams.pop(self.id, None)
        self._wake()

    def _forget_if_done(self) -> None:
        if self._local_ended and self._remote_ended:
            self._session.streams.pop(self.id, None)

    async def _wait(self) -> None:
        await self._wakeup.wait()

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = trio.Event()


class PeerSession:
    """One authenticated connection; see the module docstring."""

    def __init__(
        self,
        ws: WebSocket,
        remote_id: str,
        handlers: Mapping[str, Handler],
        stream_handlers: Mapping[str, StreamHandler] | None = None,
        *,
        max_frame: int = f.MAX_FRAME,
        dialed: bool = True,
        max_concurrent: int = MAX_CONCURRENT,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
    ) -> None:
        self._ws = ws
        self.remote_id = remote_id
        self._handlers = handlers
        self._stream_handlers = stream_handlers or {}
        self._max_frame = max_frame
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._ids = itertools.count(1)
        self._dialed = dialed
        self._stream_ids = itertools.count(1 if dialed else 2, 2)
        self._pending: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.streams: dict[int, PeerStream] = {}
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._out_ready = trio.Event()
        self._drained = trio.Event()
        self.closed = False
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.pings_missed = 0
        self.requests_served = 0
        self.requests_refused = 0
        self._in_flight = 0  # requests dispatched and not answered yet
        self.messages_sent = 0
        self.frames_sent = 0

    def __repr__(self) -> str:
        return f"<PeerSession {self.remote_id} pending={len(self._pending)} closed={self.closed}>"

    # -- calls -----------------------------------------------------------------------------

    async def request(self, method: str, payload: Any, *, timeout: float) -> Any:
        """Call ``method`` on the peer and return its answer.

        Raises:
            RemoteError: the remote handler raised.
            PeerUnreachable: the connection broke, or no answer within ``timeout``.
        """
        request_id = next(self._ids)
        done = trio.Event()
        box: list[Any] = []
        self._pending[request_id] = (done, box)
        try:
            await self.send_frame(f.Request(request_id, method, payload))
            with trio.move_on_after(timeout) as scope:
                await done.wait()
            if scope.cancelled_caught:
                raise PeerUnreachable(f"{self.remote_id}: no answer to {method} in {timeout}s")
        finally:
            self._pending.pop(request_id, None)
        (result,) = box
        if isinstance(result, BaseException):
            raise result
        return result

    async def notify(self, method: str, payload: Any) -> None:
        """Send a one-way message."""
        await self.send_frame(f.Notify(method, payload))

    async def open_stream(self, method: str, payload: Any) -> PeerStream:
        """Open a stream served by the peer's stream handler for ``method``."""
        stream = PeerStream(self, next(self._stream_ids), method)
        self.streams[stream.id] = stream
        try:
            await self.send_frame(f.StreamOpen(stream.id, method, payload))
        except BaseException:
            self.streams.pop(stream.id, None)
            raise
        return stream

    async def send_frame(self, frame: f.Frame) -> None:
        """Queue ``frame`` for the writer; waits while too many bytes are queued.

        Raises:
            PeerUnreachable: the connection is closed.
        """
        if self.closed:
            raise PeerUnreachable(f"connection to {self.remote_id} is closed")
        try:
            data = f.encode(frame)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"cannot encode {type(frame).__name__} as msgpack: {exc}") from None
        if len(data) > self._max_frame:
            raise ValueError(f"a {len(data)}-byte message exceeds max_frame {self._max_frame}")
        while self._out_bytes > HIGH_WATER:
            await self._drained.wait()
            if self.closed:
                raise PeerUnreachable(f"connection to {self.remote_id} is closed")
        self._push(data)

    def send_control(self, frame: f.Frame) -> None:
        """Queue a small stream control frame at once, past ``HIGH_WATER`` (never blocks).

        On a closed connection the frame is dropped: its streams have failed already.
        """
        if not self.closed:
            self._push(f.encode(frame))

    def _push(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        self._out_ready.set()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection (the reader then ends). A peer that does not answer the
        close handshake within ``CLOSE_TIMEOUT`` has its socket shut anyway."""
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._ws.aclose(code=code, reason=reason)

    # -- the reader and the writer ---------------------------------------------------------

    async def run(self) -> None:
        """Read and dispatch frames until the connection ends; writes go out meanwhile."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._keepalive, nursery.cancel_scope)
                await self._read_loop(nursery)
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            error = PeerUnreachable(f"connection to {self.remote_id} closed")
            for done, box in self._pending.values():
                if not box:
                    box.append(error)
                done.set()
            for stream in list(self.streams.values()):
                stream._fail(error)
            self._drained.set()

    async def _keepalive(self, session_scope: trio.CancelScope) -> None:
        """Ping the peer; one that stays silent (frozen, cut off) fails the connection, so
        pending calls and streams fail instead of hanging on an open TCP connection."""
        while True:
            await trio.sleep(self.ping_interval)
            with trio.move_on_after(self.ping_timeout) as scope:
                try:
                    await self._ws.ping()
                except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
                    return
            if scope.cancelled_caught:
                self.pings_missed += 1
                session_scope.cancel()  # run() fails everything pending on this connection
                return

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            data = message.encode() if isinstance(message, str) else message
            try:
                batch = f.decode_batch(data, max_size=self._max_frame)
            except f.FrameError as exc:
                await self.close(exc.close_code, str(exc)[:120])
                return
            for frame in batch:
                if not self._dispatch(nursery, frame):
                    await self.close(1002, f"unexpected {type(frame).__name__} frame")
                    return

    async def _write_loop(self) -> None:
        limit = min(self._max_frame - 64, BATCH_BYTES)
        while True:
            await self._out_ready.wait()
            self._out_ready = trio.Event()
            out, self._out, self._out_bytes = self._out, [], 0
            self._drained.set()
            self._drained = trio.Event()
            start = 0
            while start < len(out):
                end, size = start + 1, len(out[start])
                while end < len(out) and size + len(out[end]) + 8 <= limit:
                    size += len(out[end]) + 8
                    end += 1
                chunk = out[start:end]
                message = chunk[0] if len(chunk) == 1 else f.encode(f.Batch(tuple(chunk)))
                try:
                    await self._ws.send_message(message)
                except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
                    return  # the reader sees the close and fails everything pending
                self.messages_sent += 1
                self.frames_sent += len(chunk)
                start = end

    def _dispatch(self, nursery: trio.Nursery, frame: f.Frame) -> bool:
        match frame:
            case f.Request() | f.Notify():
                if self._in_flight >= self._limiter.total_tokens + MAX_WAITING:
                    # Handlers are bounded by the limiter; the requests queued behind it are
                    # bounded here, so a flood cannot grow tasks without limit.
                    self.requests_refused += 1
                    if isinstance(frame, f.Request):
                        self.send_control(
                            f.ErrorReply(frame.id, "Overloaded", f"{MAX_WAITING} requests queued")
                        )
                else:
                    self._in_flight += 1
                    nursery.start_soon(self._serve, frame)
            case f.Response(id=i, payload=p):
                self._resolve(i, p)
            case f.ErrorReply(id=i, error_type=t, message=m, data=d):
                self._resolve(i, RemoteError(t, m, d))
            case f.StreamOpen(stream=s, method=m, payload=p):
                return self._open_remote_stream(nursery, s, m, p)
            case f.StreamItem(stream=s, payload=p):
                stream = self.streams.get(s)
                return stream is None or stream._deliver(p)  # late items after an abort
            case f.StreamEnd(stream=s, error=e):
                stream = self.streams.get(s)
                if stream is not None:
                    stream._remote_end(e)
            case f.StreamCredit(stream=s, credit=c):
                stream = self.streams.get(s)
                if stream is not None:
                    stream._add_credit(c)
            case _:
                return False  # handshake frames are not valid after the handshake
        return True

    def _open_remote_stream(
        self, nursery: trio.Nursery, sid: int, method: str, payload: Any
    ) -> bool:
        if sid in self.streams or (sid % 2 == 1) == self._dialed:
            return False  # a live stream id, or one from our half of the id space
        stream = PeerStream(self, sid, method)
        self.streams[sid] = stream
        nursery.start_soon(self._serve_stream, stream, payload)
        return True

    def _resolve(self, request_id: int, result: Any) -> None:
        entry = self._pending.get(request_id)
        if entry is not None and not entry[1]:
            entry[1].append(result)
            entry[0].set()

    async def _serve(self, frame: f.Request | f.Notify) -> None:
        handler = self._handlers.get(frame.method)
        request_id = frame.id if isinstance(frame, f.Request) else 0
        try:
            async with self._limiter:
                answer = await self._answer(handler, frame, request_id)
                self.requests_served += 1
            if isinstance(frame, f.Request):
                try:
                    await self.send_frame(answer)
                except PeerUnreachable:
                    pass
                except ValueError as exc:  # the answer is too big (or not msgpack-able)
                    await self._send_quietly(error_frame(request_id, exc))
        finally:
            self._in_flight -= 1

    async def _answer(
        self, handler: Handler | None, frame: f.Request | f.Notify, request_id: int
    ) -> f.Frame:
        if handler is None:
            return f.ErrorReply(request_id, "UnknownMethod", frame.method)
        try:
            return f.Response(request_id, await handler(frame.payload))
        except Exception as exc:
            return error_frame(request_id, exc)

    async def _serve_stream(self, stream: PeerStream, payload: Any) -> None:
        handler = self._stream_handlers.get(stream.method)
        if handler is None:
            await stream.abort("UnknownMethod", stream.method)
            return
        try:
            await handler(stream, payload)
        except Exception as exc:
            reply = error_frame(0, exc)
            await stream.abort(reply.error_type, reply.message)
        else:
            await stream.end()

    async def _send_quietly(self, frame: f.Frame) -> None:
        with contextlib.suppress(PeerUnreachable, ValueError):
            await self.send_frame(frame)
