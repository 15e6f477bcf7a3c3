"""An in-process network for peer connections (``clusterkit.testing`` clusters).

Theory of operation
-------------------
:class:`MemoryWebSocket` has the four methods a :class:`~.session.PeerSession` and the
handshake use — ``send_message``, ``get_message``, ``aclose``, ``ping`` — over a pair of
bounded Trio memory channels, so a full peer conversation (handshake, requests, streams with
credit) runs with no socket, no thread and no real time: under ``trio.testing.MockClock`` peer
timeouts are virtual like everything else. Closing one end ends both, with the websocket close
code reported by ``ConnectionClosed`` as trio-websocket does.

:class:`MemoryNetwork` maps addresses to servers. ``serve`` registers a connection handler
under a fresh ``127.0.0.1:<n>`` address; ``connect`` creates a socket pair and runs the
server's handler for it in the server's nursery.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

import trio
from trio_websocket import CloseReason, ConnectionClosed

QUEUE = 64  # messages buffered per direction (the sender waits beyond it)


class MemoryWebSocket:
    """One end of an in-memory websocket."""

    def __init__(
        self, send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self.peer: MemoryWebSocket | None = None
        self.closed: CloseReason | None = None

    def __repr__(self) -> str:
        return f"<MemoryWebSocket closed={self.closed}>"

    async def send_message(self, message: bytes | str) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        data = message.encode() if isinstance(message, str) else bytes(message)
        try:
            await self._send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(self.closed or CloseReason(1006, "peer gone")) from None

    async def get_message(self) -> bytes:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            raise ConnectionClosed(self.closed or CloseReason(1006, "peer gone")) from None

    async def ping(self, payload: bytes | None = None) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        await trio.lowlevel.checkpoint()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close both ends (idempotent); the other end sees ``ConnectionClosed(code)``."""
        self.abort(code, reason)
        await trio.lowlevel.checkpoint()

    def abort(self, code: int, reason: str | None) -> None:
        if self.closed is not None:
            return
        self.closed = CloseReason(code, reason)
        self._send.close()
        self._receive.close()
        if self.peer is not None and self.peer.closed is None:
            self.peer.abort(code, reason)


def socket_pair() -> tuple[MemoryWebSocket, MemoryWebSocket]:
    """Two connected ends (client, server)."""
    a_send, b_receive = trio.open_memory_channel[bytes](QUEUE)
    b_send, a_receive = trio.open_memory_channel[bytes](QUEUE)
    a, b = MemoryWebSocket(a_send, a_receive), MemoryWebSocket(b_send, b_receive)
    a.peer, b.peer = b, a
    return a, b


ConnectionHandler = Callable[[MemoryWebSocket], Awaitable[None]]


class MemoryNetwork:
    """Addresses -> servers, in one process; see the module docstring."""

    def __init__(self) -> None:
        self._servers: dict[str, tuple[trio.Nursery, ConnectionHandler]] = {}
        self._open: dict[str, set[MemoryWebSocket]] = {}
        self._ports = itertools.count(1)

    def __repr__(self) -> str:
        return f"<MemoryNetwork servers={sorted(self._servers)}>"

    async def serve(
        self,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``handler`` at a fresh address (reported by ``started``) until cancelled;
        then every connection to it is closed."""
        addr = f"127.0.0.1:{next(self._ports)}"
        try:
            async with trio.open_nursery() as nursery:
                self._servers[addr] = (nursery, handler)
                self._open[addr] = set()
                task_status.started(addr)
                await trio.sleep_forever()
        finally:
            del self._servers[addr]
            for ws in self._open.pop(addr, set()):
                ws.abort(1001, "server gone")

    async def connect(self, addr: str) -> MemoryWebSocket:
        """A connection to the server at ``addr``.

        Raises:
            OSError: nothing serves ``addr``.
        """
        await trio.lowlevel.checkpoint()
        server = self._servers.get(addr)
        if server is None:
            raise ConnectionRefusedError(f"nothing serves {addr} (memory network)")
        nursery, handler = server
        client, accepted = socket_pair()
        self._open[addr].add(accepted)
        nursery.start_soon(self._run, addr, handler, accepted)
        return client

    async def _run(self, addr: str, handler: ConnectionHandler, ws: MemoryWebSocket) -> None:
        try:
            await handler(ws)
        finally:
            ws.abort(1000, None)
            self._open.get(addr, set()).discard(ws)
