"""A loopback TCP proxy with a switch, to cut a client off from etcd in tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio


class Proxy:
    """Forwards ``127.0.0.1:port`` to ``target``; :meth:`cut` drops and refuses connections."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.port = 0
        self.open = True
        self.connections = 0
        self._scopes: set[trio.CancelScope] = set()
        self._thawed = trio.Event()
        self._thawed.set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Drop every connection and refuse new ones until :meth:`restore`."""
        self.open = False
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self.open = True

    def freeze(self) -> None:
        """Keep every connection open but forward nothing (a frozen peer) until :meth:`thaw`."""
        self._thawed = trio.Event()

    def thaw(self) -> None:
        self._thawed.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.open:
                return
            self.connections += 1
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    upstream = await trio.open_tcp_stream(*self.target)
                except OSError:
                    return
                async with upstream, trio.open_nursery() as nursery:

                    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                        try:
                            async for data in src:
                                await self._thawed.wait()
                                await dst.send_all(data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(pump, client, upstream)
                    nursery.start_soon(pump, upstream, client)
            self._scopes.discard(scope)


@asynccontextmanager
async def open_proxy(target: str) -> AsyncIterator[Proxy]:
    proxy = Proxy(target)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy._handle, 0, host="127.0.0.1"))
        proxy.port = listeners[0].socket.getsockname()[1]
        yield proxy
        nursery.cancel_scope.cancel()
