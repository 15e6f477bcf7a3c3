"""A bare websocket client for tests that play a hostile or broken peer.

trio-websocket 0.12's ``open_websocket`` leaves the client's socket to the garbage collector
when the server closes first; this helper owns the TCP stream and always closes it (as
``PeerPool`` does), so no test leaks a socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio_websocket


@asynccontextmanager
async def open_raw_websocket(addr: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    host, _, port = addr.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, host, "/")
            try:
                yield ws
            finally:
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)
