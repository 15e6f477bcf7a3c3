"""A connected non-blocking socket that the Trio thread writes synchronously.

``write`` hands bytes to the kernel at once (``send``); what it does not take waits, in
order, for the :meth:`Socket.writer` task, so writing never yields and a write is never torn
by a cancellation. TLS runs over the same socket through ``ssl.SSLObject`` and memory BIOs
(ALPN h2), so TLS writes are synchronous too. Reads are ``receive()``: Trio waits until the
socket is readable, then reads what is there.
"""

from __future__ import annotations

import errno
import socket
import ssl

import trio

_RECV_CHUNK = 256 * 1024


class Socket:
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
    ) -> Socket:
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
    async def _handshake(cls, raw: socket.socket, context: ssl.SSLContext, name: str) -> Socket:
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
