"""Peer connections over trio-websocket: the handshake, the server and the client pool.

Theory of operation
-------------------
Each node serves one websocket endpoint. A connection starts with the handshake of
``handshake.py`` (challenge, answer, proof), bounded by ``HANDSHAKE_TIMEOUT``; until it
succeeds no handler can be reached, and a failed or silent handshake closes the connection
with code 1008. Afterwards both ends run the same :class:`~.session.PeerSession` (requests,
one-way messages and streams; see ``session.py``). TLS is optional and wraps the whole
websocket (``ssl_context``); the secret handshake runs inside it either way.

:class:`PeerPool` keeps one client session per peer address, opened on first use, and
drops it when it breaks; the next call reconnects, after a short backoff. Concurrent
callers to one address share one connection attempt.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Mapping
from typing import Any

import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

from .._boundary import single_errors
from .._errors import PeerAuthFailed, PeerError, PeerUnreachable, RemoteError
from . import frames as f
from .handshake import client_mac, new_nonce, server_mac, verify
from .keyring import Keyring, as_keyring
from .memory import MemoryNetwork, MemoryWebSocket
from .session import (
    CLOSE_TIMEOUT,
    PING_INTERVAL,
    PING_TIMEOUT,
    Handler,
    PeerSession,
    PeerStream,
    StreamHandler,
    WebSocket,
)

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "PeerAuthFailed",
    "PeerPool",
    "PeerSession",
    "PeerStream",
    "PeerUnreachable",
    "RemoteError",
    "serve_peers",
]

_log = logging.getLogger("clusterkit.peers")

QUEUE = 256  # websocket messages trio-websocket may buffer per connection
RECEIVE_BUFFER = 1024 * 1024  # bytes read from the socket at once
HANDSHAKE_TIMEOUT = 5.0
RECONNECT_BACKOFF = 0.2
PREAUTH_MAX_FRAME = 1024
"""Largest websocket message accepted before the handshake has authenticated the other side
(the handshake's frames are < 300 bytes). ``peer_max_message`` applies only afterwards, so an
unauthenticated connection can never make a node buffer more than this per message."""
PREAUTH_RECEIVE_BUFFER = 4096  # bytes read from the socket at once before authentication
MAX_PENDING_HANDSHAKES = 128
"""Default bound on connections accepted but not yet authenticated. When a new one arrives at
the bound, the *oldest* pending one is closed to make room: memory held for strangers stays
bounded, and a peer whose handshake takes milliseconds still gets through while an attacker
holds the bound full of silent connections (refusing new ones instead would lock every peer
out for as long as the attacker kept them)."""


def _set_limits(ws: WebSocket, max_message: int, receive_buffer: int) -> None:
    """Set a connection's message size limit and socket read size (raised once authenticated).

    trio-websocket fixes both at construction and reads ``_max_message_size`` for every message
    it assembles and ``_receive_buffer_size`` for every read; there are no public setters
    (0.12).
    """
    if isinstance(ws, trio_websocket.WebSocketConnection):  # (memory sockets have no limit)
        ws._max_message_size = max_message
        ws._receive_buffer_size = receive_buffer


async def _receive_frame(ws: WebSocket, max_frame: int, expected: type[f.Frame]) -> Any:
    message = await ws.get_message()
    data = message.encode() if isinstance(message, str) else message
    frame = f.decode(data, max_size=max_frame)
    if not isinstance(frame, expected):
        raise f.FrameError(f"expected {expected.__name__} during the handshake")
    return frame


async def server_handshake(
    ws: WebSocket, local_id: str, secret: bytes | Keyring, max_frame: int
) -> str | None:
    """Authenticate a connecting peer; returns its node id, or None (connection closed)."""
    nonce = new_nonce()
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await ws.send_message(f.encode(f.Challenge(nonce)))
            answer: f.Answer = await _receive_frame(ws, max_frame, f.Answer)
            matched = next(
                (
                    key
                    for key in as_keyring(secret).accepted()
                    if verify(client_mac(key, nonce, answer.nonce, answer.node_id), answer.mac)
                ),
                None,
            )
            if matched is None:
                await _close_bounded(ws, 1008, "authentication failed")
                return None
            proof = server_mac(matched, answer.nonce, nonce, local_id)
            await ws.send_message(f.encode(f.Proof(local_id, proof)))
            return answer.node_id
    except trio.TooSlowError:
        await _close_bounded(ws, 1008, "handshake timed out")
    except f.FrameError as exc:
        await _close_bounded(ws, exc.close_code, str(exc)[:120])
    except trio_websocket.ConnectionClosed:
        pass
    return None


async def _close_bounded(ws: WebSocket, code: int, reason: str) -> None:
    """Close with ``code``; a peer that never answers the close handshake does not hold the
    connection (trio-websocket's ``aclose`` would wait for it forever)."""
    with trio.move_on_after(CLOSE_TIMEOUT):
        await ws.aclose(code=code, reason=reason)


async def client_handshake(
    ws: WebSocket, local_id: str, secret: bytes | Keyring, max_frame: int
) -> str:
    """Authenticate to a server; returns its node id.

    Raises:
        PeerAuthFailed: the server refused us (1008), or could not prove it knows the secret.
        PeerUnreachable: the connection closed or stalled during the handshake.
    """
    nonce = new_nonce()
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            challenge: f.Challenge = await _receive_frame(ws, max_frame, f.Challenge)
            keys = as_keyring(secret)
            mac = client_mac(keys.dialing(), challenge.nonce, nonce, local_id)
            await ws.send_message(f.encode(f.Answer(local_id, nonce, mac)))
            proof: f.Proof = await _receive_frame(ws, max_frame, f.Proof)
    except trio_websocket.ConnectionClosed as exc:
        if exc.reason is not None and exc.reason.code == 1008:
            raise PeerAuthFailed(f"the peer refused our handshake: {exc.reason}") from None
        raise PeerUnreachable(f"the peer closed during the handshake: {exc.reason}") from None
    except trio.TooSlowError:
        raise PeerUnreachable(f"no handshake within {HANDSHAKE_TIMEOUT}s") from None
    except f.FrameError as exc:
        raise PeerAuthFailed(f"the peer does not speak our handshake: {exc}") from None
    if not any(
        verify(server_mac(key, nonce, challenge.nonce, proof.node_id), proof.mac)
        for key in keys.accepted()
    ):
        await ws.aclose(code=1008, reason="server proof invalid")
        raise PeerAuthFailed("the server could not prove it knows the cluster secret")
    return proof.node_id


async def serve_connection(
    ws: WebSocket,
    local_id: str,
    secret: bytes | Keyring,
    handlers: Mapping[str, Handler],
    stream_handlers: Mapping[str, StreamHandler] | None,
    *,
    max_frame: int,
    sessions: set[PeerSession] | None = None,
) -> None:
    """Authenticate one accepted connection and serve it until it ends."""
    remote = await server_handshake(ws, local_id, secret, min(max_frame, PREAUTH_MAX_FRAME))
    if remote is None:
        return
    _set_limits(ws, max_frame, RECEIVE_BUFFER)
    await serve_authenticated(
        ws, remote, handlers, stream_handlers, max_frame=max_frame, sessions=sessions
    )


async def serve_authenticated(
    ws: WebSocket,
    remote: str,
    handlers: Mapping[str, Handler],
    stream_handlers: Mapping[str, StreamHandler] | None,
    *,
    max_frame: int,
    sessions: set[PeerSession] | None = None,
) -> None:
    """Serve an authenticated connection until it ends."""
    session = PeerSession(ws, remote, handlers, stream_handlers, max_frame=max_frame, dialed=False)
    if sessions is not None:
        sessions.add(session)
    try:
        await session.run()
    finally:
        if sessions is not None:
            sessions.discard(session)


async def serve_memory_peers(
    network: MemoryNetwork,
    local_id: str,
    secret: bytes | Keyring,
    handlers: Mapping[str, Handler],
    *,
    stream_handlers: Mapping[str, StreamHandler] | None = None,
    max_frame: int = f.MAX_FRAME,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Like :func:`serve_peers`, on an in-process network; ``started`` reports the address."""

    async def on_connect(ws: MemoryWebSocket) -> None:
        await serve_connection(ws, local_id, secret, handlers, stream_handlers, max_frame=max_frame)

    await network.serve(on_connect, task_status=task_status)


async def serve_peers(
    local_id: str,
    secret: bytes | Keyring,
    handlers: Mapping[str, Handler],
    host: str,
    port: int,
    *,
    stream_handlers: Mapping[str, StreamHandler] | None = None,
    max_frame: int = f.MAX_FRAME,
    ssl_context: ssl.SSLContext | None = None,
    sessions: set[PeerSession] | None = None,
    max_pending: int | None = MAX_PENDING_HANDSHAKES,
    preauth_max_frame: int = PREAUTH_MAX_FRAME,
    stats: dict[str, int] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the peer endpoint on ``host:port`` (0: a free port, reported by ``started``).

    Before a connection has authenticated, its messages may be at most ``preauth_max_frame``
    bytes, it is read 4 KiB at a time, and at most ``max_pending`` such connections exist at
    once: at the bound, the oldest pending one is closed for the new one (None: no bound; both
    knobs exist for benchmarks/preauth.py's baseline). ``sessions``, when given, holds the live
    incoming sessions (for statistics and tests); ``stats`` counts connections ``pending``
    and ``dropped`` (closed unauthenticated to make room).
    """
    counts = stats if stats is not None else {}
    counts.setdefault("pending", 0)
    counts.setdefault("dropped", 0)
    pending: dict[int, trio.CancelScope] = {}  # insertion order: oldest first
    serial = 0

    async def handle(stream: trio.abc.Stream) -> None:
        """One TCP connection, from accept to close. Whatever goes wrong on it (a hostile or
        broken client, trio-websocket tripping over a close already under way) ends that
        connection alone: nothing raised here may reach the server's nursery."""
        nonlocal serial
        serial += 1
        me = serial
        if max_pending is not None:
            while len(pending) >= max_pending:
                pending.pop(next(iter(pending))).cancel()
                counts["dropped"] += 1
        try:
            async with trio.open_nursery() as connection:
                ws: trio_websocket.WebSocketConnection | None = None
                remote: str | None = None
                with trio.CancelScope() as scope:
                    pending[me] = scope
                    counts["pending"] = len(pending)
                    try:
                        with trio.fail_after(HANDSHAKE_TIMEOUT):  # TLS and the HTTP upgrade
                            request = await trio_websocket.wrap_server_stream(
                                connection,
                                stream,
                                QUEUE,
                                min(max_frame, preauth_max_frame),
                                PREAUTH_RECEIVE_BUFFER,
                            )
                            ws = await request.accept()
                        remote = await server_handshake(
                            ws, local_id, secret, min(max_frame, preauth_max_frame)
                        )
                    except (trio.TooSlowError, trio_websocket.ConnectionClosed):
                        pass
                    finally:
                        pending.pop(me, None)
                        counts["pending"] = len(pending)
                if ws is not None and remote is not None:
                    _set_limits(ws, max_frame, RECEIVE_BUFFER)
                    await serve_authenticated(
                        ws,
                        remote,
                        handlers,
                        stream_handlers,
                        max_frame=max_frame,
                        sessions=sessions,
                    )
                if ws is not None:
                    await _close_bounded(ws, 1000, "")
                connection.cancel_scope.cancel()
        except* Exception as group:
            counts["errors"] = counts.get("errors", 0) + 1
            _log.debug("peer connection ended with %r", group.exceptions[0])
        finally:
            await trio.aclose_forcefully(stream)

    tcp = await trio.open_tcp_listeners(port, host=host)
    sockname = tcp[0].socket.getsockname()
    listeners: list[trio.abc.Listener[Any]] = list(tcp)
    if ssl_context is not None:  # TLS wraps the whole websocket (wss)
        listeners = [trio.SSLListener(t, ssl_context, https_compatible=True) for t in tcp]
    task_status.started(int(sockname[1]))
    await trio.serve_listeners(handle, listeners)


class PeerPool:
    """One client session per peer address, opened on first use, reopened after a break.

    Args:
        nursery: where the connections' tasks run.
        local_id: the id this side presents in the handshake (a node id, or a client's).
        secret: the cluster secret.
        handlers, stream_handlers: served on these outgoing connections too (the peer may
            call back over them).
        ssl_context: TLS client context for ``wss://``; None: plain websocket.
        connect_timeout: seconds a connect (TCP, TLS, websocket upgrade) may take.
        reconnect_backoff: after a failed connect, calls fail at once for this long.
        ping_interval, ping_timeout: liveness pings on every connection (see session.py).
        network: dial through this in-process network instead of TCP (test clusters).
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        local_id: str,
        secret: bytes | Keyring,
        handlers: Mapping[str, Handler] | None = None,
        stream_handlers: Mapping[str, StreamHandler] | None = None,
        *,
        max_frame: int = f.MAX_FRAME,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = HANDSHAKE_TIMEOUT,
        reconnect_backoff: float = RECONNECT_BACKOFF,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        network: MemoryNetwork | None = None,
    ) -> None:
        self._nursery = nursery
        self._network = network
        self._pings = (ping_interval, ping_timeout)
        self._backoff = reconnect_backoff
        self._local_id = local_id
        self._secret = secret
        self._handlers = handlers if handlers is not None else {}
        self._stream_handlers = stream_handlers if stream_handlers is not None else {}
        self._max_frame = max_frame
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._sessions: dict[str, PeerSession] = {}
        self._connecting: dict[str, trio.Event] = {}
        # addr -> (when, error type, message) of the last failed connect
        self._failure: dict[str, tuple[float, type[PeerError], str]] = {}
        self._closed = False
        self.connects = 0

    def __repr__(self) -> str:
        return f"<PeerPool {self._local_id} sessions={sorted(self._sessions)}>"

    async def request(self, addr: str, method: str, payload: Any, *, timeout: float = 5.0) -> Any:
        """Send ``method(payload)`` to the peer at ``addr`` (``host:port``) and return the
        answer, all within ``timeout`` seconds.

        Raises:
            PeerUnreachable: no connection, or no answer in time.
            PeerAuthFailed: the peer does not share our secret.
            RemoteError: the remote handler raised.
        """
        deadline = trio.current_time() + timeout
        session = await self.session(addr, timeout=timeout)
        left = max(deadline - trio.current_time(), 0.0)
        return await session.request(method, payload, timeout=left)

    async def send(self, addr: str, method: str, payload: Any, *, timeout: float = 5.0) -> None:
        """Send a one-way message to the peer at ``addr`` (delivery is not confirmed)."""
        session = await self.session(addr, timeout=timeout)
        await session.notify(method, payload)

    async def open_stream(
        self, addr: str, method: str, payload: Any, *, timeout: float = 5.0
    ) -> PeerStream:
        """Open a stream to the peer at ``addr``'s stream handler for ``method``."""
        session = await self.session(addr, timeout=timeout)
        return await session.open_stream(method, payload)

    async def session(self, addr: str, *, timeout: float = 5.0) -> PeerSession:
        """The live session to ``addr``, connecting (once, shared) if there is none."""
        session = self._sessions.get(addr)
        if session is not None and not session.closed and not self._closed:
            return session  # the common case, without a cancel scope
        with trio.move_on_after(timeout) as scope:
            return await self._session(addr)
        assert scope.cancelled_caught
        raise PeerUnreachable(f"could not connect to {addr} within {timeout}s")

    async def _session(self, addr: str) -> PeerSession:
        """The live session, or one connection attempt shared by every concurrent caller.

        When an attempt fails, everyone who waited on it fails with its error, and calls
        within ``RECONNECT_BACKOFF`` of the failure fail at once (fail fast: a dead peer costs
        its callers no time, and is not dialed once per caller). ``reconnect_backoff``
        sets that window.
        """
        while True:
            if self._closed:
                raise PeerUnreachable("the peer pool is closed")
            session = self._sessions.get(addr)
            if session is not None and not session.closed:
                return session
            failure = self._failure.get(addr)
            if failure is not None and trio.current_time() - failure[0] < self._backoff:
                raise failure[1](failure[2])  # the same type: PeerAuthFailed stays one
            pending = self._connecting.get(addr)
            if pending is None:
                break
            await pending.wait()
        self._connecting[addr] = done = trio.Event()  # claimed before any await
        try:
            opened: PeerSession = await self._nursery.start(self._run_session, addr)
            self.connects += 1
            self._failure.pop(addr, None)
            return opened
        except PeerError as exc:
            self._failure[addr] = (trio.current_time(), type(exc), str(exc))
            raise
        finally:
            del self._connecting[addr]
            done.set()

    async def _run_session(self, addr: str, task_status: trio.TaskStatus[PeerSession]) -> None:
        """Own one client connection for its whole life.

        We open (and always close) the TCP stream ourselves and hand it to trio-websocket:
        ``open_websocket`` (0.12) leaves the socket to the garbage collector when the server
        closes first or the opening handshake fails.
        """
        if self._network is not None:
            await self._run_memory_session(self._network, addr, task_status)
            return
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        try:
            port_number = int(port)
        except ValueError:
            raise PeerUnreachable(f"{addr!r} is not a host:port address") from None
        started = False
        stream: trio.abc.Stream | None = None
        try:
            async with single_errors(), trio.open_nursery() as connection:
                with trio.fail_after(self._connect_timeout):
                    tcp = await trio.open_tcp_stream(host, port_number)
                    stream = tcp
                    if self._ssl is not None:
                        stream = trio.SSLStream(tcp, self._ssl, server_hostname=host)
                    ws = await trio_websocket.wrap_client_stream(
                        connection,
                        stream,
                        host,
                        "/",
                        max_message_size=min(self._max_frame, PREAUTH_MAX_FRAME),
                        message_queue_size=QUEUE,
                        receive_buffer_size=PREAUTH_RECEIVE_BUFFER,
                    )
                remote = await client_handshake(
                    ws, self._local_id, self._secret, min(self._max_frame, PREAUTH_MAX_FRAME)
                )
                _set_limits(ws, self._max_frame, RECEIVE_BUFFER)
                session = self._new_session(ws, remote)
                self._sessions[addr] = session
                task_status.started(session)
                started = True
                try:
                    await session.run()
                finally:
                    if self._sessions.get(addr) is session:
                        del self._sessions[addr]
                    # Our Close, unless the peer's ended the session (then this returns at
                    # once). Not when we are being cancelled: trio-websocket's reader, in
                    # `connection`, is cancelled too and could never read the answer, so the
                    # wait would always last its full second (every node shutdown did).
                    if trio.current_effective_deadline() != -math.inf:
                        with trio.move_on_after(1.0):
                            await ws.aclose()
                # Not cancel(): trio-websocket's reader must live on to read the peer's
                # answer to our Close, which is what wakes a ws.aclose() waiting elsewhere
                # (PeerPool.aclose, or the session closing on a protocol error). It ends when
                # the server drops the TCP connection; a silent server gets 1 s.
                connection.cancel_scope.deadline = trio.current_time() + 1.0
        except (
            OSError,
            trio.BrokenResourceError,
            trio.TooSlowError,
            trio_websocket.HandshakeError,
            trio_websocket.ConnectionClosed,
            # trio-websocket's reader trips over a peer that keeps sending (an oversized message
            # before authentication) while our close is under way: that connection is over.
            LocalProtocolError,
        ) as exc:
            if started:  # the session ran and ended; its callers have been failed already
                return
            raise PeerUnreachable(f"cannot connect to {addr}: {exc!r}") from None
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)

    def _new_session(self, ws: WebSocket, remote: str) -> PeerSession:
        return PeerSession(
            ws,
            remote,
            self._handlers,
            self._stream_handlers,
            max_frame=self._max_frame,
            dialed=True,
            ping_interval=self._pings[0],
            ping_timeout=self._pings[1],
        )

    async def _run_memory_session(
        self, network: MemoryNetwork, addr: str, task_status: trio.TaskStatus[PeerSession]
    ) -> None:
        """``_run_session`` over an in-process network (``memory.py``)."""
        try:
            with trio.fail_after(self._connect_timeout):
                ws = await network.connect(addr)
        except (OSError, trio.TooSlowError) as exc:
            raise PeerUnreachable(f"cannot connect to {addr}: {exc!r}") from None
        try:
            remote = await client_handshake(ws, self._local_id, self._secret, self._max_frame)
            session = self._new_session(ws, remote)
            self._sessions[addr] = session
            task_status.started(session)
            try:
                await session.run()
            finally:
                if self._sessions.get(addr) is session:
                    del self._sessions[addr]
        finally:
            await ws.aclose()

    async def aclose(self) -> None:
        """Close every connection; later calls raise :class:`PeerUnreachable`."""
        self._closed = True
        for session in list(self._sessions.values()):
            with trio.move_on_after(1.0):
                await session.close()
        self._sessions.clear()
