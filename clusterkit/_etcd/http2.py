"""etcd's unary calls and watch stream over HTTP/2, in the Trio thread: no thread, no hop.

Theory of operation
-------------------
grpcio runs a call's I/O outside the calling thread, so every call from Trio used to cross
threads twice (Trio -> loop -> Trio, plus gRPC's poller), 50-150 us per crossing on a small VM:
a lone call was 1.4-1.7x a blocking stub call, and 100 concurrent calls did less than the
asyncio clients (issue 10). Here the etcd client's unary calls and its watch stream speak
gRPC's wire format themselves (h2wire.py), on a non-blocking socket the Trio thread owns
(h2socket.py). Our generated stubs take a :class:`Channel` as their channel.

- **Writing is synchronous.** A call encodes its HEADERS (a header block built once per method
  and endpoint, plus ``grpc-timeout`` and metadata as HPACK literals that never touch the
  server's table) and its DATA frames into one buffer and hands it to ``Socket.write``, which
  ``send()`` s it at once; only what the kernel does not take waits for the connection's writer
  task. So a call costs no scheduler round to send, a write is never torn by a cancellation,
  and an abort function (which Trio runs synchronously) can send RST_STREAM.
- **One reader task per connection** (in the etcd client's nursery) reads whatever the socket holds,
  parses every frame in it and reschedules each finished call's task directly
  (``trio.lowlevel.reschedule``): one wakeup for a whole burst of answers; the caller decodes
  its own response. Watch responses are handed to the watch hub as they are parsed.
- **Flow control.** We announce a 16 MiB window per stream and 2^31-1 for the connection. A
  unary call gives window back as its answer arrives (its size is bounded by
  ``max_receive``); a :class:`BidiStream` gives back all but the bytes of the messages its
  consumer has not released, so a consumer that sits on 16 MiB of them stops the server
  instead of growing memory. Padding counts like data. Our own DATA respects the server's
  stream and connection windows and frame size: what does not fit waits, in order, for its
  WINDOW_UPDATE. The server's MAX_CONCURRENT_STREAMS is respected by queueing calls.
- **HPACK.** Answers are decoded by ``hpack.Decoder`` in arrival order (every header block,
  even of a stream we have already reset, since they all update the table); blocks made only
  of one-byte indexed fields come from a cache (h2wire.Decoder).
- **Cancellation and deadlines.** Each call has a Trio deadline and sends ``grpc-timeout``. A
  cancelled or timed-out call sends RST_STREAM(CANCEL) from its abort function; frames that
  still arrive for it are read and dropped (their DATA still counts for the window).
- **Failure.** A connection that fails (connect error, EOF, reset, protocol error, an
  unanswered keepalive ping) ends every call and stream on it with UNAVAILABLE; the next call
  opens a new connection. GOAWAY fails only the streams the server did not take (retry-safe)
  and the connection drains. A keepalive PING is sent when streams are open and nothing was
  read for ``keepalive`` seconds (5 s: etcd's enforcement minimum), and the connection fails
  if the answer takes ``keepalive_timeout`` seconds, as grpcio's channel options did.

The lease lane (lease calls and the keepalive stream) stays on the grpc.aio bridge
(bridge.py), in a loop thread with a connection of its own, so that keepalives go out while
the Trio thread is starved. Errors are :class:`RpcError` (a ``grpc.RpcError`` with ``code()``
and ``details()``), so status.py translates them like grpcio's.
"""

from __future__ import annotations

import functools
import logging
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
import hpack
import trio

from .h2socket import Socket
from .h2wire import (
    ACK,
    CONTINUATION,
    DATA,
    E_CANCEL,
    E_NO_ERROR,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADER,
    HEADERS,
    MAX_HEADER_BLOCK,
    MAX_STREAM_ID,
    MAX_WINDOW,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_CODES,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    SETTINGS,
    U32,
    WINDOW_UPDATE,
    Decoder,
    Metadata,
    RpcError,
    frame,
    grpc_timeout,
    literal,
    message,
    request_block,
    status_of,
)

__all__ = ["BidiStream", "Channel", "Connection", "RpcError", "StreamMethod", "UnaryMethod"]

_log = logging.getLogger("clusterkit")
_STREAM_WINDOW = 16 * 1024 * 1024  # per stream; returned in steps of 1/8


# -- streams on a connection ----------------------------------------------------------------


class _Stream:
    """What a connection knows of one HTTP/2 stream: a unary call or a bidirectional stream."""

    __slots__ = (
        "block",
        "body",
        "conn",
        "done",
        "end_stream",
        "headers",
        "held",
        "received",
        "returned",
        "send_window",
        "stream_id",
    )

    def __init__(self, block: bytes, body: bytes, end_stream: bool) -> None:
        self.block = block  # the header block, until the stream is opened
        self.body = body  # DATA not yet sent (the windows were full, or not yet opened)
        self.end_stream = end_stream  # the last DATA ends our side (unary)
        self.conn: Connection | None = None
        self.stream_id = 0
        self.send_window = 0
        self.received = 0  # DATA bytes read on this stream
        self.returned = 0  # ... of which given back to the server's window
        self.held = 0  # ... of which the consumer still holds (not to be given back)
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.done = False

    def data_received(self, flags: int, payload: bytes) -> None:
        raise NotImplementedError

    def trailers_received(self, trailers: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    def ended(self, error: RpcError) -> None:
        """The stream ended without its trailers (reset, connection lost, cancelled)."""
        raise NotImplementedError

    def _return_window(self) -> None:
        conn = self.conn
        if conn is None or self.done:
            return
        n = self.received - self.held - self.returned
        if n >= _STREAM_WINDOW // 8:
            self.returned += n
            conn.write(frame(WINDOW_UPDATE, 0, self.stream_id, U32.pack(n)))


class _Call(_Stream):
    """One unary call: what arrived for it, and the task waiting for it."""

    __slots__ = ("data", "error", "max_receive", "task", "trailers")

    def __init__(self, block: bytes, body: bytes, max_receive: int) -> None:
        super().__init__(block, body, True)
        self.task: trio.lowlevel.Task | None = None  # set while the caller is parked
        self.data = bytearray()
        self.max_receive = max_receive
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.error: RpcError | None = None

    def data_received(self, flags: int, payload: bytes) -> None:
        self.data += payload
        self.received += len(payload)
        conn = self.conn
        assert conn is not None
        if len(self.data) > self.max_receive:
            conn.reset(self)
            self._finish(RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the response is too large"))
        elif flags & END_STREAM:
            conn.closed(self)
            self._finish(None)
        else:
            self._return_window()

    def trailers_received(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = trailers
        self._finish(None)

    def ended(self, error: RpcError) -> None:
        self._finish(error)

    def _finish(self, error: RpcError | None) -> None:
        if self.done:
            return
        self.done = True
        self.error = error
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)


class Connection:
    """One HTTP/2 connection to one server, owned by the Trio thread."""

    def __init__(self, target: str, *, keepalive: float, keepalive_timeout: float) -> None:
        self.target = target
        self.keepalive = keepalive
        self.keepalive_timeout = keepalive_timeout
        self.sock: Socket | None = None
        self.connected = False  # streams wait in ``waiting`` until then
        self.error: RpcError | None = None  # set once: the connection is unusable
        self.draining = False  # GOAWAY seen or ids exhausted: no new streams
        self.streams: dict[int, _Stream] = {}
        self.waiting: deque[_Stream] = deque()  # not yet opened (connecting, or at the limit)
        self.blocked: deque[_Stream] = deque()  # DATA waiting for window
        self.next_id = 1
        self.max_streams = 2**31
        self.max_frame = 16_384
        self.peer_initial_window = 65_535
        self.send_window = 65_535
        self.unacked = 0  # DATA bytes read since the last connection WINDOW_UPDATE
        self.last_read = time.monotonic()
        self.decoder = Decoder()
        self.scope = trio.CancelScope()
        self._partial: tuple[int, int, bytearray] | None = None  # HEADERS + CONTINUATIONs
        self.on_closed: Callable[[Connection], None] | None = None

    def __repr__(self) -> str:
        state = "failed" if self.error else ("draining" if self.draining else "open")
        return f"<http2.Connection {self.target} {state} streams={len(self.streams)}>"

    @property
    def usable(self) -> bool:
        return self.error is None and not self.draining

    # -- life -----------------------------------------------------------------------

    async def run(self, connect: Callable[[], Any]) -> None:
        """Connect, then read and keep alive until the connection fails or is closed."""
        with self.scope:
            try:
                self.sock = await connect()
            except (OSError, ssl.SSLError, trio.TooSlowError) as exc:
                self.fail(f"failed to connect to {self.target}: {exc}")
                return
            settings = struct.pack(">HLHL", S_ENABLE_PUSH, 0, S_INITIAL_WINDOW_SIZE, _STREAM_WINDOW)
            self.write(
                PREFACE
                + frame(SETTINGS, 0, 0, settings)
                + frame(WINDOW_UPDATE, 0, 0, U32.pack(MAX_WINDOW - 65_535))
            )
            self.connected = True
            self._open_waiting()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self.sock.writer)
                    nursery.start_soon(self._guard, self._keepalive)
                    await self._guard(self._read)
            finally:
                self.fail(f"connection to {self.target} closed")
                self.sock.close()

    async def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            await fn()
        except (OSError, ssl.SSLError, ValueError, struct.error, hpack.HPACKError) as exc:
            self.fail(f"connection to {self.target} failed: {exc!r}")

    def fail(self, details: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        """End every stream on the connection and close it (idempotent)."""
        if self.error is None:
            self.error = RpcError(code, details)
        streams = [*self.streams.values(), *self.waiting]
        self.streams.clear()
        self.waiting.clear()
        self.blocked.clear()
        for stream in streams:
            stream.ended(self.error)
        if self.sock is not None and self.sock.broken is None:
            self.sock.broken = ConnectionAbortedError("closed")  # no more writes
        self.scope.cancel()  # run() closes the socket once its tasks have stopped
        if self.on_closed is not None:
            on_closed, self.on_closed = self.on_closed, None
            on_closed(self)

    def write(self, data: bytes) -> None:
        sock = self.sock
        if sock is None or self.error is not None:
            return
        sock.write(data)
        if sock.broken is not None:
            self.fail(f"connection to {self.target} failed: {sock.broken!r}")

    # -- opening, sending, closing streams --------------------------------------------

    def start(self, stream: _Stream) -> None:
        """Open ``stream`` now, or once connected and under MAX_CONCURRENT_STREAMS."""
        stream.conn = self
        if self.error is not None:
            stream.ended(self.error)
        elif not self.connected or len(self.streams) >= self.max_streams:
            self.waiting.append(stream)
        else:
            self._open(stream)

    def _open_waiting(self) -> None:
        while self.waiting and len(self.streams) < self.max_streams and self.error is None:
            self._open(self.waiting.popleft())

    def _open(self, stream: _Stream) -> None:
        sid = self.next_id
        self.next_id += 2
        if self.next_id > MAX_STREAM_ID:
            self.draining = True
        stream.stream_id = sid
        stream.send_window = self.peer_initial_window
        self.streams[sid] = stream
        block = stream.block
        stream.block = b""
        out = []
        first = True
        while first or block:
            chunk, block = block[: self.max_frame], block[self.max_frame :]
            kind = HEADERS if first else CONTINUATION
            out.append(frame(kind, 0 if block else END_HEADERS, sid, chunk))
            first = False
        out.append(self._data_frames(stream))
        self.write(b"".join(out))

    def send(self, stream: _Stream, data: bytes) -> None:
        """Queue DATA on an open (or waiting) stream and send what the windows allow."""
        stream.body += data
        if stream.stream_id and stream not in self.blocked:
            self.write(self._data_frames(stream))

    def _data_frames(self, stream: _Stream) -> bytes:
        """As much of ``stream.body`` as the windows allow, as DATA frames."""
        out = []
        body = stream.body
        while body:
            n = min(len(body), self.max_frame, stream.send_window, self.send_window)
            if n <= 0:
                break
            chunk, body = body[:n], body[n:]
            stream.send_window -= n
            self.send_window -= n
            last = stream.end_stream and not body
            out.append(frame(DATA, END_STREAM if last else 0, stream.stream_id, chunk))
        stream.body = body
        if body:
            self.blocked.append(stream)
        return b"".join(out)

    def _unblock(self) -> None:
        blocked, self.blocked = self.blocked, deque()
        out = [self._data_frames(s) for s in blocked if s.stream_id in self.streams]
        if out:
            self.write(b"".join(out))

    def reset(self, stream: _Stream) -> None:
        """We end ``stream``: RST_STREAM(CANCEL), or drop it if it was never opened."""
        if stream.stream_id == 0:
            if stream in self.waiting:
                self.waiting.remove(stream)
            return
        if self.streams.pop(stream.stream_id, None) is not None:
            self.write(frame(RST_STREAM, 0, stream.stream_id, U32.pack(E_CANCEL)))
            self._stream_gone()

    def closed(self, stream: _Stream) -> None:
        """The server ended ``stream`` (END_STREAM)."""
        if self.streams.pop(stream.stream_id, None) is not None:
            self._stream_gone()

    def _stream_gone(self) -> None:
        self._open_waiting()
        if self.draining and not self.streams and not self.waiting:
            self.fail(f"connection to {self.target} drained")

    # -- reading ---------------------------------------------------------------------

    async def _keepalive(self) -> None:
        # Checked every keepalive/2: a PING goes out once nothing was read for ``keepalive``
        # seconds while streams are open, so pings are never closer than ``keepalive`` (its
        # answer counts as a read), which is what etcd's enforcement asks for.
        while True:
            await trio.sleep(self.keepalive / 2)
            now = time.monotonic()
            if self.streams and now - self.last_read >= self.keepalive:
                self.write(frame(PING, 0, 0, b"ckping00"))
                with trio.move_on_after(self.keepalive_timeout):
                    while self.last_read < now:
                        await trio.sleep(self.keepalive_timeout / 8)
                    continue
                self.fail(f"{self.target} did not answer a keepalive ping")
                return

    async def _read(self) -> None:
        sock = self.sock
        assert sock is not None
        buf = b""
        while True:
            data = await sock.receive()
            if not data:
                self.fail(f"{self.target} closed the connection")
                return
            self.last_read = time.monotonic()
            buf = buf + data if buf else data
            pos, end = 0, len(buf)
            while end - pos >= 9:
                hi, lo, kind, flags, sid = HEADER.unpack_from(buf, pos)
                length = (hi << 8) | lo
                if end - pos - 9 < length:
                    break
                payload = buf[pos + 9 : pos + 9 + length]
                pos += 9 + length
                self._frame(kind, flags, sid & MAX_STREAM_ID, payload)
                if self.error is not None:
                    return
            buf = buf[pos:]

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self._partial is not None and kind != CONTINUATION:
            raise ValueError("a header block was interrupted")
        if kind == DATA:
            self.unacked += len(payload)
            if self.unacked >= MAX_WINDOW // 2:
                self.write(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.unacked)))
                self.unacked = 0
            stream = self.streams.get(sid)
            if stream is not None:  # (a stream we reset: its data only counts for the window)
                if flags & PADDED:
                    stream.received += payload[0] + 1  # padding counts for the window too
                    payload = payload[1 : len(payload) - payload[0]]
                stream.data_received(flags, payload)
        elif kind == HEADERS:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            if flags & END_HEADERS:
                self._on_headers(sid, flags, payload)
            else:
                self._partial = (sid, flags, bytearray(payload))
        elif kind == CONTINUATION:
            if self._partial is None or self._partial[0] != sid:
                raise ValueError("CONTINUATION without HEADERS")
            block = self._partial[2]
            block += payload
            if len(block) > MAX_HEADER_BLOCK:
                raise ValueError("header block too large")
            if flags & END_HEADERS:
                psid, pflags, _ = self._partial
                self._partial = None
                self._on_headers(psid, pflags, bytes(block))
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(sid, U32.unpack(payload)[0] & MAX_WINDOW)
        elif kind == PING:
            if not flags & ACK:
                self.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.pop(sid, None)
            if stream is not None:
                (code,) = U32.unpack(payload)
                status = RST_CODES.get(code, grpc.StatusCode.INTERNAL)
                stream.ended(RpcError(status, f"stream reset by the server (code {code})"))
                self._stream_gone()
        elif kind == GOAWAY:
            self._on_goaway(payload)
        elif kind == PUSH_PROMISE:
            raise ValueError("PUSH_PROMISE although push is disabled")
        # PRIORITY and unknown frame types are ignored.

    def _on_headers(self, sid: int, flags: int, block: bytes) -> None:
        headers = self.decoder.decode(block)  # always: the table must follow the server's
        stream = self.streams.get(sid)
        if stream is None:
            return
        if flags & END_STREAM:
            self.closed(stream)
            stream.trailers_received(headers)
        elif stream.headers is None:
            stream.headers = headers
        # (HEADERS in the middle of a stream are not gRPC: ignored.)

    def _on_settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            ident, value = struct.unpack_from(">HL", payload, i)
            if ident == S_MAX_CONCURRENT_STREAMS:
                self.max_streams = value
            elif ident == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ValueError("INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif ident == S_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise ValueError("MAX_FRAME_SIZE out of range")
                self.max_frame = value
        self.write(frame(SETTINGS, ACK, 0))
        self._unblock()
        self._open_waiting()  # a larger MAX_CONCURRENT_STREAMS may open waiting streams

    def _on_window_update(self, sid: int, increment: int) -> None:
        if sid == 0:
            self.send_window += increment
        else:
            stream = self.streams.get(sid)
            if stream is None:
                return
            stream.send_window += increment
        if self.blocked:
            self._unblock()

    def _on_goaway(self, payload: bytes) -> None:
        last, code = struct.unpack_from(">LL", payload)
        last &= MAX_STREAM_ID
        self.draining = True
        details = f"{self.target} is going away (HTTP/2 code {code})"
        if code != E_NO_ERROR:
            extra = payload[8:].decode("utf-8", "replace")
            _log.info("clusterkit: etcd %s sent GOAWAY %s %s", self.target, code, extra)
        gone = [self.streams.pop(s) for s in list(self.streams) if s > last]
        gone += self.waiting
        self.waiting.clear()
        for stream in gone:
            stream.ended(RpcError(grpc.StatusCode.UNAVAILABLE, details))
        self._stream_gone()


# -- the channel: what the generated stubs call ---------------------------------------------


class Channel:
    """A gRPC channel to one endpoint whose methods are Trio calls.

    The generated stubs take it as their channel (``KVStub(channel)``): ``stub.Range`` is then
    a :class:`UnaryMethod`, ``await stub.Range(request, timeout=5)``, and ``stub.Watch`` a
    :class:`StreamMethod` that opens a :class:`BidiStream`. There is one connection at a time;
    a failed or draining one is replaced on the next call. Each connection's task runs in the
    owner's nursery: ``spawn`` is its ``start_soon`` (the etcd client's, see client.py).
    """

    def __init__(
        self,
        target: str,
        spawn: Callable[..., object],
        *,
        context: ssl.SSLContext | None = None,
        server_name: str | None = None,
        keepalive: float = 5.0,
        keepalive_timeout: float = 2.0,
        connect_timeout: float = 5.0,
        max_receive: int = 256 * 1024 * 1024,
        max_send: int = 16 * 1024 * 1024,
    ) -> None:
        self.target = target
        self._spawn = spawn
        host, _, port = target.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.context = context
        self.server_name = server_name
        self.keepalive = keepalive
        self.keepalive_timeout = keepalive_timeout
        self.connect_timeout = connect_timeout
        self.max_receive = max_receive
        self.max_send = max_send
        self.authority = server_name or target
        self._conn: Connection | None = None
        self._connections: set[Connection] = set()
        self._closed = False
        self.started = 0
        self.finished = 0
        self.cancelled = 0

    def __repr__(self) -> str:
        return f"<http2.Channel {self.target} {self._conn!r}>"

    def unary_unary(
        self,
        path: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        **_: Any,
    ) -> UnaryMethod:
        return UnaryMethod(self, path, request_serializer, response_deserializer)

    def stream_stream(
        self,
        path: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        **_: Any,
    ) -> StreamMethod:
        return StreamMethod(self, path, request_serializer, response_deserializer)

    def unary_stream(self, path: str, *args: Any, **kwargs: Any) -> None:
        return None  # etcd's only such method (Snapshot) is not used

    stream_unary = unary_stream

    def connection(self) -> Connection:
        """The current connection, or a new one (connecting in the owner's nursery)."""
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        if self._closed:
            raise RpcError(grpc.StatusCode.CANCELLED, "the etcd client is closed")
        conn = self._conn = Connection(
            self.target, keepalive=self.keepalive, keepalive_timeout=self.keepalive_timeout
        )
        conn.on_closed = self._connections.discard
        self._connections.add(conn)

        async def connect() -> Socket:
            with trio.fail_after(self.connect_timeout):
                return await Socket.connect(self.host, self.port, self.context, self.server_name)

        self._spawn(_guarded, conn, connect, name=f"clusterkit-h2 {self.target}")
        return conn

    def close(self) -> None:
        """End every call and stream (CANCELLED) and close the connections."""
        self._closed = True
        for conn in list(self._connections):
            conn.fail("the etcd client is closed", grpc.StatusCode.CANCELLED)
        self._connections.clear()
        self._conn = None


async def _guarded(conn: Connection, connect: Callable[[], Any]) -> None:
    """A connection's task. A bug in it fails that connection (logged), never its owner's
    nursery: the calls on it end with UNAVAILABLE and the next call opens a new one."""
    try:
        await conn.run(connect)
    except Exception as exc:
        conn.fail(f"connection to {conn.target} crashed: {exc!r}")
        _log.error("clusterkit: HTTP/2 connection to %s crashed", conn.target, exc_info=exc)
    except BaseException as exc:  # cancelled from outside (the owner's nursery is closing)
        conn.fail(f"connection to {conn.target} stopped: {exc!r}")
        raise


class _Method:
    """One method of one channel, with its constant header block."""

    __slots__ = ("_block", "channel", "deserialize", "path", "serialize")

    def __init__(
        self,
        channel: Channel,
        path: str,
        serialize: Callable[[Any], bytes] | None,
        deserialize: Callable[[bytes], Any] | None,
    ) -> None:
        self.channel = channel
        self.path = path
        self.serialize = serialize or (lambda m: m)
        self.deserialize = deserialize or (lambda b: b)
        self._block = request_block(path, channel.authority, channel.context is not None)

    def _headers(self, metadata: Metadata, *extra: bytes) -> bytes:
        block = b"".join((self._block, *extra))
        if metadata:
            block += b"".join(literal(k.encode(), v.encode()) for k, v in metadata)
        return block

    def _encode(self, request: Any) -> bytes:
        body = self.serialize(request)
        if len(body) > self.channel.max_send:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request is {len(body)} bytes, over the limit of {self.channel.max_send}",
            )
        return message(body)


@functools.lru_cache(maxsize=64)
def _timeout_header(seconds: float) -> bytes:
    """The ``grpc-timeout`` header (calls almost always use the client's one timeout)."""
    return literal(b"grpc-timeout", grpc_timeout(seconds))


class UnaryMethod(_Method):
    """One unary method of one channel: ``await method(request, timeout=..., metadata=...)``."""

    __slots__ = ()

    async def __call__(self, request: Any, *, timeout: float, metadata: Metadata = None) -> Any:
        """Call the method; raises :class:`RpcError` unless the status is OK."""
        await trio.lowlevel.checkpoint_if_cancelled()
        channel = self.channel
        block = self._headers(metadata, _timeout_header(timeout))
        call = _Call(block, self._encode(request), channel.max_receive + 5)
        channel.started += 1
        try:
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                conn = channel.connection()
                conn.start(call)
                if not call.done:

                    def abort(_: Any) -> trio.lowlevel.Abort:
                        call.task = None
                        if not call.done:
                            call.done = True
                            conn.reset(call)
                            channel.cancelled += 1
                        return trio.lowlevel.Abort.SUCCEEDED

                    call.task = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(abort)
            if scope.cancelled_caught:
                raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        finally:
            channel.finished += 1
        if call.error is not None:
            raise call.error
        if call.trailers is None:
            raise RpcError(grpc.StatusCode.INTERNAL, "the server ended the call without status")
        error = status_of(call.headers, call.trailers)
        if error is not None:
            raise error
        return self._decode(call.data)

    def _decode(self, data: bytearray) -> Any:
        if len(data) < 5:
            raise RpcError(grpc.StatusCode.INTERNAL, "the server sent no response message")
        if data[0] != 0:
            raise RpcError(grpc.StatusCode.INTERNAL, "the server sent a compressed message")
        (length,) = U32.unpack_from(data, 1)
        if length + 5 != len(data):
            raise RpcError(grpc.StatusCode.INTERNAL, "the server sent a malformed response")
        return self.deserialize(bytes(memoryview(data)[5:]))


class StreamMethod(_Method):
    """One bidirectional method of one channel: ``method.open(...)`` opens a stream."""

    __slots__ = ()

    def open(
        self,
        *,
        metadata: Metadata,
        on_response: Callable[[Any], None],
        on_error: Callable[[BaseException | None], None],
    ) -> BidiStream:
        """Open a stream; see :class:`BidiStream` for the callbacks."""
        return BidiStream(self, self._headers(metadata), on_response, on_error)


class BidiStream(_Stream):
    """A bidirectional gRPC stream read by the connection's reader task, in the Trio thread.

    ``on_response(message)`` runs in the reader task for every message and must not block;
    ``on_error(exc)`` runs once when the stream ends: with the :class:`RpcError` (or
    ``EOFError`` for a clean end by the server) that ended it, or ``None`` after
    :meth:`aclose`. Neither is ever called from inside :meth:`send`, :meth:`release` or the
    constructor. The consumer calls :meth:`release` once for every message it has finished
    with: the bytes of messages not yet released are kept out of the stream's HTTP/2 window,
    so a consumer that holds ``_STREAM_WINDOW`` bytes of them stops the server (flow control)
    instead of growing memory.
    """

    __slots__ = (
        "_buffer",
        "_inside",
        "_on_error",
        "_on_response",
        "_reported",
        "_sizes",
        "method",
    )

    def __init__(
        self,
        method: StreamMethod,
        block: bytes,
        on_response: Callable[[Any], None],
        on_error: Callable[[BaseException | None], None],
    ) -> None:
        super().__init__(block, b"", False)
        self.method = method
        self._on_response = on_response
        self._on_error = on_error
        self._buffer = bytearray()
        self._sizes: deque[int] = deque()  # sizes of the messages not yet released
        self._reported = False
        self._inside = True  # in the constructor or send(): on_error must wait
        try:
            method.channel.connection().start(self)
        except RpcError as exc:  # the channel is closed
            self.ended(exc)
        finally:
            self._inside = False

    @property
    def closed(self) -> bool:
        """True once the stream's end has been reported (``on_error`` has run)."""
        return self._reported

    def send(self, request: Any) -> None:
        """Send a request on the stream (never blocks; queued while the windows are full).

        Raises:
            RpcError: RESOURCE_EXHAUSTED, the request is over the channel's ``max_send``.
        """
        if self.done or self.conn is None:
            return
        self._inside = True
        try:
            self.conn.send(self, self.method._encode(request))
        finally:
            self._inside = False

    def release(self, n: int = 1) -> None:
        """Give back ``n`` messages' worth of window after consuming ``n`` messages."""
        while n > 0 and self._sizes:
            self.held -= self._sizes.popleft()
            n -= 1
        self._return_window()

    async def aclose(self) -> None:
        """Reset the stream (RST_STREAM) and report its end (``on_error(None)``)."""
        if not self.done:
            self.done = True
            if self.conn is not None:
                self.conn.reset(self)
            self._report(None)
        await trio.lowlevel.checkpoint()

    # Called by the connection.
    def data_received(self, flags: int, payload: bytes) -> None:
        self.received += len(payload)
        buffer = self._buffer
        buffer += payload
        while len(buffer) >= 5 and not self.done:
            (length,) = U32.unpack_from(buffer, 1)
            if len(buffer) < 5 + length:
                break
            if buffer[0] != 0:
                self._abort(RpcError(grpc.StatusCode.INTERNAL, "a compressed message"))
                return
            data = bytes(memoryview(buffer)[5 : 5 + length])
            del buffer[: 5 + length]
            self.held += 5 + length
            self._sizes.append(5 + length)
            try:
                message = self.method.deserialize(data)
                self._on_response(message)
            except BaseException as exc:  # a bad message or consumer: end the stream
                self._abort(exc)
                return
        if len(buffer) > self.method.channel.max_receive + 5:
            self._abort(RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "a message is too large"))
            return
        if flags & END_STREAM and not self.done:
            conn = self.conn
            assert conn is not None
            conn.closed(self)
            self.ended(RpcError(grpc.StatusCode.INTERNAL, "the stream ended without status"))
            return
        self._return_window()

    def trailers_received(self, trailers: list[tuple[bytes, bytes]]) -> None:
        error = status_of(self.headers, trailers)
        self.ended(error if error is not None else EOFError("stream ended"))

    def ended(self, error: BaseException) -> None:
        # Never reported from inside the caller's send() or the constructor (a write that
        # finds the connection broken ends the stream at once): from the scheduler then.
        self.done = True
        if self._inside:
            trio.lowlevel.current_trio_token().run_sync_soon(self._report, error)
        else:
            self._report(error)

    def _abort(self, error: BaseException) -> None:
        if self.conn is not None and not self.done:
            self.conn.reset(self)
        self.ended(error)

    def _report(self, error: BaseException | None) -> None:
        if self._reported:
            return
        self._reported = True
        try:
            self._on_error(error)
        except Exception:  # the reader task must go on
            _log.exception("clusterkit: a stream's on_error raised")
