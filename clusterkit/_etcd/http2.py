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

Long-lived streams (watch, keepalive) and the lease lane stay on the grpc.aio bridge
(bridge.py): they gain nothing here and keep their own connections.

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

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject | None) -> None:
        self.sock = sock
        self.tls = tls
        self._in = ssl.MemoryBIO() if tls else None
        self._out = ssl.MemoryBIO() if tls else None
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
                    return cls(raw, None)
                return await cls._handshake(raw, context, server_name or host)
            except BaseException:
                raw.close()
                raise
        raise error or OSError(errno.EHOSTUNREACH, f"no address for {host}")

    @classmethod
    async def _handshake(cls, raw: socket.socket, context: ssl.SSLContext, name: str) -> _Socket:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
        self = cls(raw, tls)
        self._in, self._out = incoming, outgoing
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush_tls()
                await self._await_sent()
                data = await self._recv_raw()
                if not data:
                    raise ConnectionResetError("the server closed the connection during TLS")
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


# -- calls and connections ------------------------------------------------------------------


class _Call:
    """One unary call: its stream, what arrived for it, and the task waiting for it."""

    __slots__ = (
        "block",
        "body",
        "data",
        "done",
        "error",
        "headers",
        "send_window",
        "stream_id",
        "task",
        "trailers",
    )

    def __init__(self, block: bytes, body: bytes) -> None:
        self.block = block
        self.body = body  # DATA still to send (all of it until the stream is opened)
        self.task: trio.lowlevel.Task | None = None  # set while the caller is parked
        self.stream_id = 0
        self.send_window = 0
        self.data = bytearray()
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.error: RpcError | None = None
        self.done = False


class Connection:
    """One HTTP/2 connection to one server, owned by the Trio thread."""

    def __init__(
        self, target: str, *, keepalive: float, keepalive_timeout: float, max_receive: int
    ) -> None:
        self.target = target
        self.max_receive = max_receive + 5  # the message and its gRPC prefix
        self.keepalive = keepalive
        self.keepalive_timeout = keepalive_timeout
        self.sock: _Socket | None = None
        self.ready = trio.Event()
        self.error: RpcError | None = None  # set once: the connection is unusable
        self.draining = False  # GOAWAY seen or ids exhausted: no new streams
        self.calls: dict[int, _Call] = {}
        self.waiting: deque[_Call] = deque()  # over MAX_CONCURRENT_STREAMS
        self.blocked: deque[_Call] = deque()  # DATA waiting for window
        self.next_id = 1
        self.max_streams = 2**31
        self.max_frame = 16_384
        self.peer_initial_window = 65_535
        self.send_window = 65_535
        self.unacked = 0  # DATA bytes read since the last connection WINDOW_UPDATE
        self.last_read = time.monotonic()
        self.ping_sent: float | None = None
        self.decoder = _Decoder()
        self.scope = trio.CancelScope()
        self._partial: tuple[int, int, bytearray] | None = None  # HEADERS + CONTINUATIONs
        self.on_closed: Callable[[Connection], None] | None = None

    def __repr__(self) -> str:
        state = "failed" if self.error else ("draining" if self.draining else "open")
        return f"<http2.Connection {self.target} {state} calls={len(self.calls)}>"

    # -- life -----------------------------------------------------------------------

    async def run(self, connect: Callable[[], Any]) -> None:
        """Connect, then read and keep alive until the connection fails or is closed."""
        with self.scope:
            try:
                self.sock = await connect()
            except (OSError, ssl.SSLError, trio.TooSlowError) as exc:
                self.fail(f"failed to connect to {self.target}: {exc}")
                return
            self.sock.write(
                PREFACE
                + frame(
                    SETTINGS,
                    0,
                    0,
                    struct.pack(">HLHL", S_ENABLE_PUSH, 0, S_INITIAL_WINDOW_SIZE, MAX_WINDOW),
                )
                + frame(WINDOW_UPDATE, 0, 0, _U32.pack(MAX_WINDOW - 65_535))
            )
            self.ready.set()
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
        """Fail every call on the connection and close it (idempotent)."""
        if self.error is None:
            self.error = RpcError(code, details)
        self.ready.set()
        calls = [*self.calls.values(), *self.waiting]
        self.calls.clear()
        self.waiting.clear()
        self.blocked.clear()
        for call in calls:
            self._finish(call, self.error)
        if self.sock is not None and self.sock.broken is None:
            self.sock.broken = ConnectionAbortedError("closed")  # no more writes
        self.scope.cancel()  # run() closes the socket once its tasks have stopped
        if self.on_closed is not None:
            on_closed, self.on_closed = self.on_closed, None
            on_closed(self)

    @property
    def usable(self) -> bool:
        return self.error is None and not self.draining

    def _write(self, data: bytes) -> None:
        sock = self.sock
        assert sock is not None
        sock.write(data)
        if sock.broken is not None and self.error is None:
            self.fail(f"connection to {self.target} failed: {sock.broken!r}")

    # -- calls ------------------------------------------------------------------------

    def start(self, call: _Call) -> None:
        """Open ``call``'s stream now, or queue it behind MAX_CONCURRENT_STREAMS."""
        if self.error is not None:
            self._finish(call, self.error)
        elif len(self.calls) >= self.max_streams:
            self.waiting.append(call)
        else:
            self._open(call)

    def _open(self, call: _Call) -> None:
        sid = self.next_id
        self.next_id += 2
        if self.next_id > MAX_STREAM_ID:
            self.draining = True
        call.stream_id = sid
        call.send_window = self.peer_initial_window
        self.calls[sid] = call
        block = call.block
        out = []
        first = True
        while first or block:
            chunk, block = block[: self.max_frame], block[self.max_frame :]
            kind = HEADERS if first else CONTINUATION
            out.append(frame(kind, 0 if block else END_HEADERS, sid, chunk))
            first = False
        call.block = b""
        out.append(self._data_frames(call))
        self._write(b"".join(out))

    def _data_frames(self, call: _Call) -> bytes:
        """As much of ``call.body`` as the windows allow, as DATA frames."""
        out = []
        body = call.body
        while body:
            n = min(len(body), self.max_frame, call.send_window, self.send_window)
            if n <= 0:
                break
            chunk, body = body[:n], body[n:]
            call.send_window -= n
            self.send_window -= n
            out.append(frame(DATA, 0 if body else END_STREAM, call.stream_id, chunk))
        call.body = body
        if body:
            self.blocked.append(call)
        return b"".join(out)

    def _unblock(self) -> None:
        blocked, self.blocked = self.blocked, deque()
        out = []
        for call in blocked:
            if call.stream_id in self.calls:
                out.append(self._data_frames(call))
        if out:
            self._write(b"".join(out))

    def cancel(self, call: _Call) -> None:
        """The caller gave up: reset the stream (or drop it from the queue)."""
        call.task = None
        if call.done:
            return
        call.done = True
        if call.stream_id == 0:
            if call in self.waiting:
                self.waiting.remove(call)
            return
        if self.calls.pop(call.stream_id, None) is not None and self.error is None:
            self._write(frame(RST_STREAM, 0, call.stream_id, _U32.pack(E_CANCEL)))
            self._stream_closed()

    def _finish(self, call: _Call, error: RpcError | None = None) -> None:
        if call.done:
            return
        call.done = True
        call.error = error
        task, call.task = call.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _stream_closed(self) -> None:
        while self.waiting and len(self.calls) < self.max_streams and self.error is None:
            self._open(self.waiting.popleft())
        if self.draining and not self.calls and not self.waiting:
            self.fail(f"connection to {self.target} drained")

    # -- reading ---------------------------------------------------------------------

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(self.keepalive)
            now = time.monotonic()
            if self.ping_sent is not None:
                continue
            if self.calls and now - self.last_read >= self.keepalive:
                self.ping_sent = now
                self._write(frame(PING, 0, 0, b"ckping00"))
                with trio.move_on_after(self.keepalive_timeout):
                    while self.last_read < now:
                        await trio.sleep(self.keepalive_timeout / 8)
                    self.ping_sent = None
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
            self._on_data(flags, sid, payload)
        elif kind == HEADERS:
            if flags & PADDED:
                pad = payload[0]
                payload = payload[1 : len(payload) - pad]
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
                self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            call = self.calls.pop(sid, None)
            if call is not None:
                (code,) = _U32.unpack(payload)
                status = _RST_CODES.get(code, grpc.StatusCode.INTERNAL)
                self._finish(call, RpcError(status, f"stream reset by the server (code {code})"))
                self._stream_closed()
        elif kind == GOAWAY:
            self._on_goaway(payload)
        elif kind == PUSH_PROMISE:
            raise ValueError("PUSH_PROMISE although push is disabled")
        # PRIORITY and unknown frame types are ignored.

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        self.unacked += len(payload)
        if self.unacked >= MAX_WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.unacked)))
            self.unacked = 0
        call = self.calls.get(sid)
        if call is None:
            return  # a stream we reset: its data only counts for the window
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        call.data += payload
        if len(call.data) > self.max_receive:
            del self.calls[sid]
            self._write(frame(RST_STREAM, 0, sid, _U32.pack(E_CANCEL)))
            error = RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the response is too large")
            self._finish(call, error)
            self._stream_closed()
        elif flags & END_STREAM:
            self._close_stream(call, None)

    def _on_headers(self, sid: int, flags: int, block: bytes) -> None:
        headers = self.decoder.decode(block)  # always: the table must follow the server's
        call = self.calls.get(sid)
        if call is None:
            return
        if call.headers is None and not flags & END_STREAM:
            call.headers = headers
            return
        if flags & END_STREAM:
            self._close_stream(call, headers)
        # (HEADERS in the middle of a stream are not gRPC: ignored.)

    def _close_stream(self, call: _Call, trailers: list[tuple[bytes, bytes]] | None) -> None:
        del self.calls[call.stream_id]
        call.trailers = trailers
        self._finish(call)
        self._stream_closed()

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
                for call in self.calls.values():
                    call.send_window += delta
            elif ident == S_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise ValueError("MAX_FRAME_SIZE out of range")
                self.max_frame = value
        self._write(frame(SETTINGS, ACK, 0))
        self._unblock()
        self._stream_closed()  # a larger MAX_CONCURRENT_STREAMS may start queued calls

    def _on_window_update(self, sid: int, increment: int) -> None:
        if sid == 0:
            self.send_window += increment
        else:
            call = self.calls.get(sid)
            if call is None:
                return
            call.send_window += increment
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
        for sid in [s for s in self.calls if s > last]:
            self._finish(self.calls.pop(sid), RpcError(grpc.StatusCode.UNAVAILABLE, details))
        waiting, self.waiting = list(self.waiting), deque()
        for call in waiting:
            self._finish(call, RpcError(grpc.StatusCode.UNAVAILABLE, details))
        self._stream_closed()


def _status(call: _Call) -> RpcError | None:
    """The call's gRPC status from its trailers (or its HTTP status), None when OK."""
    trailers = call.trailers
    if trailers is None:
        return RpcError(grpc.StatusCode.INTERNAL, "the server ended the stream without a status")
    found = dict(trailers)
    if call.headers is not None:
        found = {**dict(call.headers), **found}
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


# -- the channel: what the generated stubs call ---------------------------------------------


class Channel:
    """A gRPC channel to one endpoint whose unary methods are Trio calls.

    The generated stubs take it as their channel (``KVStub(channel)``): ``stub.Range`` is then
    a :class:`UnaryMethod`, ``await stub.Range(request, timeout=5)``. Other arities are not
    provided (streams use the grpc.aio bridge).
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

    def stream_stream(self, path: str, *args: Any, **kwargs: Any) -> None:
        return None  # not provided here: streams run on the grpc.aio bridge

    unary_stream = stream_unary = stream_stream

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        if self._closed:
            raise RpcError(grpc.StatusCode.CANCELLED, "the etcd client is closed")
        conn = self._conn = Connection(
            self.target,
            keepalive=self.keepalive,
            keepalive_timeout=self.keepalive_timeout,
            max_receive=self.max_receive,
        )
        conn.on_closed = self._connections.discard
        self._connections.add(conn)

        async def connect() -> _Socket:
            with trio.fail_after(self.connect_timeout):
                return await _Socket.connect(self.host, self.port, self.context, self.server_name)

        trio.lowlevel.spawn_system_task(_guarded, conn, connect, name=f"clusterkit-h2 {self}")
        return conn

    def close(self) -> None:
        """Fail every call in flight (CANCELLED) and close the connections."""
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


class UnaryMethod:
    """One unary method of one channel: ``await method(request, timeout=..., metadata=...)``."""

    __slots__ = ("_blocks", "channel", "deserialize", "path", "serialize")

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
        self._blocks = request_block(path, channel.authority, channel.context is not None)

    async def __call__(self, request: Any, *, timeout: float, metadata: Metadata = None) -> Any:
        """Call the method; raises :class:`RpcError` unless the status is OK."""
        await trio.lowlevel.checkpoint_if_cancelled()
        channel = self.channel
        body = self.serialize(request)
        block = self._blocks + literal(b"grpc-timeout", grpc_timeout(timeout))
        if metadata:
            block += b"".join(literal(k.encode(), v.encode()) for k, v in metadata)
        call = _Call(block, b"\x00" + _U32.pack(len(body)) + body)
        deadline = trio.current_time() + timeout
        channel.started += 1
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                conn = channel._connection()
                if not conn.ready.is_set():
                    await conn.ready.wait()
                conn.start(call)
                if not call.done:

                    def abort(_: Any) -> trio.lowlevel.Abort:
                        conn.cancel(call)
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
        error = _status(call)
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
        if length > self.channel.max_receive:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the response is too large")
        return self.deserialize(bytes(memoryview(data)[5:]))
