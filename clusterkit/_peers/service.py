"""``ck.peers``: the node's peer endpoint and its calls to other nodes, by node id.

The node serves one websocket endpoint (its ``Node.peer_addr()``, on ``peer_port``) and keeps one
outgoing connection per peer (:class:`~.transport.PeerPool`). Handlers are registered by
method name, before or after the node joined; a request for a method nobody registered
answers ``RemoteError("UnknownMethod", method)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from .._core.records import Node
from .._errors import PeerUnreachable
from .keyring import Keyring
from .session import Handler, PeerStream, StreamHandler
from .transport import PeerPool

H = TypeVar("H", bound=Handler)
S = TypeVar("S", bound=StreamHandler)

RESERVED_PREFIX = "clusterkit."


class Peers:
    """Talk to other nodes: requests, one-way messages and streams, by node.

    ``node`` arguments take a :class:`Node`, a node id (looked up in the current view) or a
    ``"host:port"`` address. Every call is bounded: ``timeout`` defaults to the config's
    ``peer_timeout``.
    """

    def __init__(
        self,
        pool: PeerPool,
        resolve: Callable[[str], Node | None],
        *,
        address: str,
        timeout: float,
        handlers: dict[str, Handler],
        stream_handlers: dict[str, StreamHandler],
    ) -> None:
        self._pool = pool
        self._resolve = resolve
        self.timeout = timeout
        self.handlers = handlers
        self.stream_handlers = stream_handlers
        self.address = address
        """``host:port`` of this node's own peer endpoint."""
        self.served: dict[str, list[int]] = {}
        """Per method served (handlers and stream handlers): ``[calls, errors]``."""

    def __repr__(self) -> str:
        return f"<Peers at {self.address} handlers={sorted(self.handlers)}>"

    @property
    def secret(self) -> bytes | Keyring:
        """The cluster secret (or keyring) this node authenticates with: never log it."""
        return self._pool._secret

    async def aclose(self) -> None:
        """Close every outgoing connection (the node is leaving)."""
        await self._pool.aclose()

    # -- serving ---------------------------------------------------------------------------

    def handler(self, method: str) -> Callable[[H], H]:
        """Decorator: serve requests and one-way messages for ``method``.

        ``async def handler(payload) -> answer``; the answer and payload are any msgpack
        values. An exception becomes the caller's :class:`RemoteError`.
        """

        def register(fn: H) -> H:
            self.add_handler(method, fn)
            return fn

        return register

    def stream_handler(self, method: str) -> Callable[[S], S]:
        """Decorator: serve streams opened for ``method``.

        ``async def handler(stream, payload)``: send with ``await stream.send(x)``, receive
        with ``async for x in stream``; returning ends this side, raising aborts the stream.
        """

        def register(fn: S) -> S:
            self.add_stream_handler(method, fn)
            return fn

        return register

    def add_handler(self, method: str, fn: Handler, *, _internal: bool = False) -> None:
        """Register ``fn`` for ``method`` (replacing an earlier one).

        Raises:
            ValueError: ``method`` is empty, too long, or starts with ``clusterkit.``
                (reserved for clusterkit's own services).
        """
        _check_method(method, _internal)
        counts = self.served.setdefault(method, [0, 0])

        async def counted(payload: Any) -> Any:
            counts[0] += 1
            try:
                return await fn(payload)
            except Exception:
                counts[1] += 1
                raise

        self.handlers[method] = counted

    def add_stream_handler(
        self, method: str, fn: StreamHandler, *, _internal: bool = False
    ) -> None:
        """Register the stream handler ``fn`` for ``method`` (same rules as handlers)."""
        _check_method(method, _internal)
        counts = self.served.setdefault(method, [0, 0])

        async def counted(stream: PeerStream, payload: Any) -> None:
            counts[0] += 1
            try:
                await fn(stream, payload)
            except Exception:
                counts[1] += 1
                raise

        self.stream_handlers[method] = counted

    # -- calling ---------------------------------------------------------------------------

    def address_of(self, node: Node | str) -> str:
        """The peer address (``host:port``) of ``node``.

        Raises:
            PeerUnreachable: ``node`` is an id that is not in the current view.
        """
        if isinstance(node, Node):
            addr = node.peer_addr()
            if not addr:
                raise PeerUnreachable(f"node {node.id} has no peer endpoint")
            return addr
        found = self._resolve(node)
        if found is not None and found.peer_addr():
            return found.peer_addr()
        if ":" in node and not found:
            return node
        raise PeerUnreachable(f"node {node!r} is not a live member of the cluster")

    async def request(
        self, node: Node | str, method: str, payload: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Call ``method`` on ``node`` and return its answer.

        Raises:
            PeerUnreachable: not reachable, or no answer within ``timeout``.
            PeerAuthFailed: the node does not share the cluster secret.
            RemoteError: the remote handler raised (``remote_type``, ``remote_message``).
        """
        t = self.timeout if timeout is None else timeout
        return await self._pool.request(self.address_of(node), method, payload, timeout=t)

    async def send(
        self, node: Node | str, method: str, payload: Any = None, *, timeout: float | None = None
    ) -> None:
        """Send a one-way message (queued for sending; delivery is not confirmed)."""
        t = self.timeout if timeout is None else timeout
        await self._pool.send(self.address_of(node), method, payload, timeout=t)

    @asynccontextmanager
    async def stream(
        self, node: Node | str, method: str, payload: Any = None, *, timeout: float | None = None
    ) -> AsyncIterator[PeerStream]:
        """Open a stream to ``node``'s stream handler for ``method``.

        ``async with ck.peers.stream(node, "m", arg) as s:`` — ``await s.send(x)``,
        ``async for x in s``, ``await s.end()``. Leaving the block before both sides ended
        aborts the stream. ``timeout`` bounds the connect only.
        """
        t = self.timeout if timeout is None else timeout
        stream = await self._pool.open_stream(self.address_of(node), method, payload, timeout=t)
        try:
            yield stream
        finally:
            await stream.abort()


def _check_method(method: str, internal: bool) -> None:
    if not isinstance(method, str) or not 0 < len(method) <= 256:
        raise ValueError("a method name is a non-empty string of at most 256 characters")
    if method.startswith(RESERVED_PREFIX) and not internal:
        raise ValueError(f"method names starting with {RESERVED_PREFIX!r} are reserved")
