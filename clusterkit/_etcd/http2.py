"""Unary gRPC calls to etcd over HTTP/2, in the Trio thread: no loop thread, no wakeups.

Theory of operation
-------------------
grpcio runs a call's I/O outside the calling thread, so every call from Trio used to cross
threads twice (Trio -> loop -> Trio, plus gRPC's poller), 50-150 us per crossing on a small VM:
a lone call was 1.4-1.7x a blocking stub call, and 100 concurrent calls did less than the
asyncio clients (issue 10). Here the unary calls of the "main" lane speak gRPC's wire format
themselves, on a non-blocking socket the Trio thread owns:

- **Writing is synchronous.** A call encodes its HEADERS (a header block built once per method
  and endpoint, plus ``grpc-timeout`` and metadata as HPACK literals that never touch the
  server's table) and its DATA frames into one buffer and hands it to :meth:`_Socket.write`,
  which ``send()`` s it at once; only what the kernel does not take waits for the connection's
  writer task. So a call costs no scheduler round to send, a write is never torn by a
  cancellation, and an abort function (which Trio runs synchronously) can send RST_STREAM.
- **One reader task per connection** reads whatever the socket holds, parses every frame in
  it and reschedules each finished call's task directly (``trio.lowlevel.reschedule``): one
  wakeup for a whole burst of answers, and the caller decodes its own response.
- **Flow control.** We announce a 2^31-1 byte window per stream and for the connection and
  return what we read to the connection window in large steps, so answers are never held
  back (a unary answer is bounded by ``max_receive``). Our own DATA respects the server's
  stream and connection windows and frame size: what does not fit waits, in order, for its
  WINDOW_UPDATE. The server's MAX_CONCURRENT_STREAMS is respected by queueing calls.
- **HPACK.** Requests use literals without indexing, so the server's decoder table is never
  grown by us; answers are decoded by ``hpack.Decoder`` in arrival order (every header block,
  even of a stream we have already reset, since they all update the table). A block made only
  of one-byte indexed fields (what Go's encoder sends for a repeated ``:status`` and
  ``grpc-status``) is decoded from a cache that is dropped whenever the table may change.
- **Cancellation and deadlines.** Each call has a Trio deadline and sends ``grpc-timeout``. A
  cancelled or timed-out call sends RST_STREAM(CANCEL) from its abort function; frames that
  still arrive for it are read and dropped (their DATA still counts for the window).
- **Failure.** A connection that fails (connect error, EOF, reset, protocol error, an
  unanswered keepalive ping) fails every call on it with UNAVAILABLE; the next call opens a
  new connection. GOAWAY fails only the streams the server did not take (retry-safe) and the
  connection drains. A keepalive PING is sent when calls are open and nothing was read for
  ``keepalive`` seconds (5 s: etcd's enforcement minimum), and the connection fails if the
  answer takes ``keepalive_timeout`` seconds, as grpcio's channel options did.
- **TLS** runs over the same non-blocking socket through ``ssl.SSLObject`` and memory BIOs,
  with ALPN ``h2``; writes stay synchronous.

The watch stream is a :class:`BidiStream` on the same connection: its responses are handed
to the watch hub by the reader task as they are parsed. The lease lane (lease calls and the
keepalive stream) stays on the grpc.aio bridge (bridge.py), in a loop thread with a connection
of its own, so that keepalives go out while the Trio thread is starved.

Errors are :class:`RpcError` (a ``grpc.RpcError`` with ``code()`` and ``details()``), so
status.py translates them like grpcio's.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import ssl
import struct
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import hpack
import trio

_log = logging.getLogger("clusterkit")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Settings.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6
# Error codes.
E_NO_ERROR, E_PROTOCOL, E_FLOW_CONTROL, E_REFUSED_STREAM, E_CANCEL = 0, 1, 3, 7, 8
E_ENHANCE_YOUR_CALM, E_INADEQUATE_SECURITY = 11, 12

MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
_HEADER = struct.Struct(">HBBBL")  # length (24 bits as H + B), type, flags, stream id
_U32 = struct.Struct(">L")
_RECV_CHUNK = 256 * 1024
_MAX_HEADER_BLOCK = 1024 * 1024
_STREAM_WINDOW = 16 * 1024 * 1024  # per stream; returned in steps of 1/8

Metadata = Sequence[tuple[str, str]] | None


class RpcError(grpc.RpcError):  # type: ignore[misc]
    """A call over :mod:`http2` ended with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}
_RST_CODES = {
    E_REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE,
    E_CANCEL: grpc.StatusCode.CANCELLED,
    E_ENHANCE_YOUR_CALM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    E_INADEQUATE_SECURITY: grpc.StatusCode.PERMISSION_DENIED,
}
_HTTP_CODES = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}


# -- HPACK, the encoding side: literals without indexing ---------------------------------------


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    return _hpack_int(len(data), 7, 0) + data


def literal(name: bytes, value: bytes) -> bytes:
    """A header as an HPACK literal without indexing, with a literal name."""
    return b"\x00" + _string(name) + _string(value)


def _indexed_name_literal(index: int, value: bytes) -> bytes:
    return _hpack_int(index, 4, 0) + _string(value)


def request_block(path: str, authority: str, tls: bool) -> bytes:
    """The constant part of a call's header block (everything but timeout and metadata)."""
    return b"".join(
        (
            b"\x83",  # :method POST (static table 3)
            b"\x87" if tls else b"\x86",  # :scheme https / http (7 / 6)
            _indexed_name_literal(4, path.encode()),  # :path
            _indexed_name_literal(1, authority.encode()),  # :authority
            _indexed_name_literal(31, b"application/grpc"),  # content-type
            literal(b"te", b"trailers"),
            _indexed_name_literal(58, b"clusterkit-http2"),  # user-agent
        )
    )


def grpc_timeout(seconds: float) -> bytes:
    """``grpc-timeout`` for ``seconds``: at most 8 digits, in the finest unit that fits."""
    micros = max(1, math.ceil(seconds * 1e6))
    for unit, scale in ((b"u", 1), (b"m", 1_000), (b"S", 1_000_000), (b"M", 60_000_000)):
        value = -(-micros // scale)
        if value < 100_000_000:
            return str(value).encode() + unit
    return b"99999999H"


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEADER.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + payload


class _Decoder:
    """``hpack.Decoder`` with a cache for blocks that only reference the table."""

    def __init__(self) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=_MAX_HEADER_BLOCK)
        self._cache: dict[bytes, list[tuple[bytes, bytes]]] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        headers = [(bytes(n), bytes(v)) for n, v in self._decoder.decode(block, raw=True)]
        # A block of one-byte indexed fields (0x81-0xfe) reads the table and never changes it.
        if block and all(b > 0x80 and b != 0xFF for b in block):
            if len(self._cache) < 256:
                self._cache[block] = headers
        else:
            self._cache.clear()  # the table may have changed
        return headers


# -- the socket ---------------------------------------------------------------------------


class _Socket:
    """A connected non-blocking socket with synchronous writes (TLS through memory BIOs)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tls: ssl.SSLObject | None = None
        self._in: ssl.MemoryBIO | None = None
        self._out: ssl.MemoryBIO | None = None
        self.pending = bytearray()  # written, not yet taken by the kernel
        self.want_write = trio.Event()
        self.broken: BaseException | None = None

    @classmethod
    async def connect(
        cls, host: str, port: int, context: ssl.SSLContext | None, server_name: str | None
    ) -> _Socket:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError | None = None
        for family, type_, proto, _, addr in infos:
            raw = socket.socket(family, type_, proto)
            try:
                raw.setblocking(False)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tsock = trio.socket.from_stdlib_socket(raw)
                await tsock.connect(addr)  # (the trio wrapper shares ``raw``)
            except OSError as exc:
                raw.close()
                error = exc
                continue
            except BaseException:
                raw.close()
                raise
            try:
                if context is None:
                    return cls(raw)
                return await cls._handshake(raw, context, server_name or host)
            except BaseException:
                raw.close()
                raise
        raise error or OSError(errno.EHOSTUNREACH, f"no address for {host}")

    @classmethod
    async def _handshake(cls, raw: socket.socket, context: ssl.SSLContext, name: str) -> _Socket:
        self = cls(raw)
        incoming, outgoing = self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush_tls()
                await self._await_sent()
                data = await self._recv_raw()
                if not data:
                    raise ConnectionResetError(
                        "the server closed the connection during TLS"
                    ) from None
                incoming.write(data)
        self._flush_tls()
        await self._await_sent()
        if tls.selected_alpn_protocol() != "h2":
            raise ConnectionError("the server did not agree to HTTP/2 (ALPN h2)")
        return self

    async def _await_sent(self) -> None:
        while self.pending:
            await trio.lowlevel.wait_writable(self.sock)
            self._send_pending()

    async def _recv_raw(self) -> bytes:
        while True:
            try:
                return self.sock.recv(_RECV_CHUNK)
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_readable(self.sock)

    def write(self, data: bytes) -> None:
        """Send ``data`` now, as far as the kernel takes it; the rest is sent in order later."""
        if self.broken is not None:
            return
        if self.tls is not None:
            try:
                self.tls.write(data)
            except ssl.SSLError as exc:
                self.broken = exc
                return
            self._flush_tls()
            return
        self._send(data)

    def _flush_tls(self) -> None:
        assert self._out is not None
        data = self._out.read()
        if data:
            self._send(data)

    def _send(self, data: bytes) -> None:
        if self.pending:
            self.pending += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.broken = exc
            return
        if sent < len(data):
            self.pending += data[sent:]
            self.want_write.set()

    def _send_pending(self) -> None:
        try:
            sent = self.sock.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.broken = exc
            return
        del self.pending[:sent]

    async def writer(self) -> None:
        """Send what the kernel did not take at once (the connection runs this as a task)."""
        while self.broken is None:
            await self.want_write.wait()
            self.want_write = trio.Event()
            while self.pending and self.broken is None:
                await trio.lowlevel.wait_writable(self.sock)
                self._send_pending()

    async def receive(self) -> bytes:
        """The next bytes from the server (``b""`` at EOF)."""
        if self.tls is None:
            return await self._recv_raw()
        assert self._in is not None
        while True:
            chunks = []
            try:
                while True:
                    chunks.append(self.tls.read(_RECV_CHUNK))
                    if not chunks[-1]:  # TLS close_notify
                        return b"".join(chunks)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return b"".join(chunks)
            self._flush_tls()  # e.g. a key update's answer
            if chunks:
                return b"".join(chunks)
            data = await self._recv_raw()
            if not data:
                return b""
            self._in.write(data)

    def close(self) -> None:
        """Close the socket (no task may be waiting on it any more)."""
        if self.broken is None:
            self.broken = ConnectionAbortedError("closed")
        self.sock.close()


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
            conn.write(frame(WINDOW_UPDATE, 0, self.stream_id, _U32.pack(n)))


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
        self.sock: _Socket | None = None
        self.ready = trio.Event()
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
        self.decoder = _Decoder()
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
                + frame(WINDOW_UPDATE, 0, 0, _U32.pack(MAX_WINDOW - 65_535))
            )
            self.ready.set()
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
        self.ready.set()
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
        elif not self.ready.is_set() or len(self.streams) >= self.max_streams:
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
            self.write(frame(RST_STREAM, 0, stream.stream_id, _U32.pack(E_CANCEL)))
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
                hi, lo, kind, flags, sid = _HEADER.unpack_from(buf, pos)
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
                self.write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.unacked)))
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
            if len(block) > _MAX_HEADER_BLOCK:
                raise ValueError("header block too large")
            if flags & END_HEADERS:
                psid, pflags, _ = self._partial
                self._partial = None
                self._on_headers(psid, pflags, bytes(block))
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(sid, _U32.unpack(payload)[0] & MAX_WINDOW)
        elif kind == PING:
            if not flags & ACK:
                self.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.pop(sid, None)
            if stream is not None:
                (code,) = _U32.unpack(payload)
                status = _RST_CODES.get(code, grpc.StatusCode.INTERNAL)
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


def _status(
    headers: list[tuple[bytes, bytes]] | None, trailers: list[tuple[bytes, bytes]]
) -> RpcError | None:
    """The gRPC status of a finished stream (from its trailers, or its HTTP status)."""
    found = dict(trailers)
    if headers is not None:
        found = {**dict(headers), **found}
    status = found.get(b"grpc-status")
    if status is None:
        http = found.get(b":status", b"")
        code = _HTTP_CODES.get(int(http) if http.isdigit() else 0, grpc.StatusCode.UNKNOWN)
        return RpcError(code, f"HTTP status {http.decode(errors='replace')} without grpc-status")
    if status == b"0":
        return None
    code = _BY_VALUE.get(int(status) if status.isdigit() else -1, grpc.StatusCode.UNKNOWN)
    message = urllib.parse.unquote(found.get(b"grpc-message", b"").decode("utf-8", "replace"))
    return RpcError(code, message)


def _message(body: bytes) -> bytes:
    """``body`` as one uncompressed gRPC message (its 5-byte prefix, then the bytes)."""
    return b"\x00" + _U32.pack(len(body)) + body


# -- the channel: what the generated stubs call ---------------------------------------------


class Channel:
    """A gRPC channel to one endpoint whose methods are Trio calls.

    The generated stubs take it as their channel (``KVStub(channel)``): ``stub.Range`` is then
    a :class:`UnaryMethod`, ``await stub.Range(request, timeout=5)``, and ``stub.Watch`` a
    :class:`StreamMethod` that opens a :class:`BidiStream`. There is one connection at a time;
    a failed or draining one is replaced on the next call.
    """

    def __init__(
        self,
        target: str,
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
        """The current connection, or a new one (connecting in a system task)."""
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

        async def connect() -> _Socket:
            with trio.fail_after(self.connect_timeout):
                return await _Socket.connect(self.host, self.port, self.context, self.server_name)

        trio.lowlevel.spawn_system_task(_guarded, conn, connect, name=f"clusterkit-h2 {self}")
        return conn

    def close(self) -> None:
        """End every call and stream (CANCELLED) and close the connections."""
        self._closed = True
        for conn in list(self._connections):
            conn.fail("the etcd client is closed", grpc.StatusCode.CANCELLED)
        self._connections.clear()
        self._conn = None


async def _guarded(conn: Connection, connect: Callable[[], Any]) -> None:
    """A connection's task, as a Trio system task: it must never raise (but Cancelled)."""
    try:
        await conn.run(connect)
    except BaseException as exc:
        conn.fail(f"connection to {conn.target} crashed: {exc!r}")
        if isinstance(exc, BaseExceptionGroup):
            _, rest = exc.split(trio.Cancelled)
            if rest is None:
                raise  # the run is ending
        if isinstance(exc, trio.Cancelled):
            raise
        _log.error("clusterkit: HTTP/2 connection to %s crashed", conn.target, exc_info=exc)


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
        return _message(body)


class UnaryMethod(_Method):
    """One unary method of one channel: ``await method(request, timeout=..., metadata=...)``."""

    __slots__ = ()

    async def __call__(self, request: Any, *, timeout: float, metadata: Metadata = None) -> Any:
        """Call the method; raises :class:`RpcError` unless the status is OK."""
        await trio.lowlevel.checkpoint_if_cancelled()
        channel = self.channel
        block = self._headers(metadata, literal(b"grpc-timeout", grpc_timeout(timeout)))
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
        error = _status(call.headers, call.trailers)
        if error is not None:
            raise error
        return self._decode(call.data)

    def _decode(self, data: bytearray) -> Any:
        if len(data) < 5:
            raise RpcError(grpc.StatusCode.INTERNAL, "the server sent no response message")
        if data[0] != 0:
            raise RpcError(grpc.StatusCode.INTERNAL, "the server sent a compressed message")
        (length,) = _U32.unpack_from(data, 1)
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
            (length,) = _U32.unpack_from(buffer, 1)
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
        error = _status(self.headers, trailers)
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
