"""Peer sessions over trio-websocket: handshake, request/response, one-way messages.

Theory of operation
-------------------
Each node serves one websocket endpoint. A connection starts with the handshake of
``handshake.py`` (challenge, answer, proof), bounded by ``HANDSHAKE_TIMEOUT``; until it
succeeds no handler can be reached. Afterwards both ends run the same :class:`PeerSession`:
ONE reader task decodes frames (``frames.py``) and dispatches them — requests and one-way
messages to handlers (each in its own task, at most ``max_concurrent`` at a time), responses
and errors to the waiting caller by request id. Many requests share one connection.

A frame the decoder refuses closes that connection with a proper close code (1002 protocol
error, 1009 too big, 1008 failed authentication); the node goes on. When a connection ends,
every request still waiting on it fails with :class:`PeerUnreachable`. A handler that raises
answers with an error frame; the caller gets :class:`RemoteError` with the remote type and
message.

:class:`PeerPool` keeps one client session per peer address, opened on first use, and
drops it when it breaks; the next request reconnects, after a short backoff.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
import trio_websocket

from .._errors import PeerError
from . import frames as f
from .handshake import client_mac, new_nonce, server_mac, verify

Handler = Callable[[Any], Awaitable[Any]]
HANDSHAKE_TIMEOUT = 5.0
RECONNECT_BACKOFF = 0.2


class PeerUnreachable(PeerError):
    """The peer could not be reached, or the connection broke before the answer came."""


class PeerAuthFailed(PeerError):
    """The peer did not prove it knows the cluster secret."""


class RemoteError(PeerError):
    """The remote handler raised.

    Attributes:
        remote_type: the exception class name on the remote node.
        remote_message: its message.
    """

    def __init__(self, remote_type: str, remote_message: str) -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message


class PeerSession:
    """One authenticated connection; see the module docstring."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        remote_id: str,
        handlers: Mapping[str, Handler],
        *,
        max_frame: int,
        max_concurrent: int = 64,
    ) -> None:
        self._ws = ws
        self.remote_id = remote_id
        self._handlers = handlers
        self._max_frame = max_frame
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.closed = False
        self.requests_served = 0

    def __repr__(self) -> str:
        return f"<PeerSession {self.remote_id} pending={len(self._pending)} closed={self.closed}>"

    async def request(self, method: str, payload: Any, *, timeout: float) -> Any:
        """Call ``method`` on the peer and return its answer.

        Raises:
            RemoteError: the remote handler raised.
            PeerUnreachable: the connection broke, or no answer within ``timeout``.
        """
        if self.closed:
            raise PeerUnreachable(f"connection to {self.remote_id} is closed")
        request_id = next(self._ids)
        done = trio.Event()
        box: list[Any] = []
        self._pending[request_id] = (done, box)
        try:
            await self._send(f.Request(request_id, method, payload))
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
        await self._send(f.Notify(method, payload))

    async def _send(self, frame: f.Frame) -> None:
        try:
            await self._ws.send_message(f.encode(frame))
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError) as exc:
            raise PeerUnreachable(f"connection to {self.remote_id} broke: {exc}") from None

    async def run(self) -> None:
        """Read and dispatch frames until the connection ends."""
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        message = await self._ws.get_message()
                    except trio_websocket.ConnectionClosed:
                        break
                    data = message.encode() if isinstance(message, str) else message
                    try:
                        frame = f.decode(data, max_size=self._max_frame)
                    except f.FrameError as exc:
                        await self._ws.aclose(code=exc.close_code, reason=str(exc)[:120])
                        break
                    if not self._dispatch(nursery, frame):
                        await self._ws.aclose(code=1002, reason="unexpected frame")
                        break
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            error = PeerUnreachable(f"connection to {self.remote_id} closed")
            for done, box in self._pending.values():
                if not box:
                    box.append(error)
                done.set()

    def _dispatch(self, nursery: trio.Nursery, frame: f.Frame) -> bool:
        match frame:
            case f.Request() | f.Notify():
                nursery.start_soon(self._serve, frame)
            case f.Response(id=i, payload=p):
                self._resolve(i, p)
            case f.ErrorReply(id=i, error_type=t, message=m):
                self._resolve(i, RemoteError(t, m))
            case _:
                return False  # streams and handshake frames are not valid here (yet)
        return True

    def _resolve(self, request_id: int, result: Any) -> None:
        entry = self._pending.get(request_id)
        if entry is not None and not entry[1]:
            entry[1].append(result)
            entry[0].set()

    async def _serve(self, frame: f.Request | f.Notify) -> None:
        handler = self._handlers.get(frame.method)
        reply: f.Frame | None
        async with self._limiter:
            if handler is None:
                reply = f.ErrorReply(0, "UnknownMethod", frame.method)
            else:
                try:
                    result = await handler(frame.payload)
                    reply = f.Response(0, result)
                except Exception as exc:
                    reply = f.ErrorReply(0, type(exc).__name__, str(exc)[:1000])
            self.requests_served += 1
        if isinstance(frame, f.Request):
            match reply:
                case f.Response(payload=p):
                    answer: f.Frame = f.Response(frame.id, p)
                case f.ErrorReply(error_type=t, message=m):
                    answer = f.ErrorReply(frame.id, t, m)
            with contextlib.suppress(PeerUnreachable):
                await self._send(answer)


async def _receive_frame(
    ws: trio_websocket.WebSocketConnection, max_frame: int, expected: type[f.Frame]
) -> Any:
    message = await ws.get_message()
    data = message.encode() if isinstance(message, str) else message
    frame = f.decode(data, max_size=max_frame)
    if not isinstance(frame, expected):
        raise f.FrameError(f"expected {expected.__name__} during the handshake")
    return frame


async def server_handshake(
    ws: trio_websocket.WebSocketConnection, local_id: str, secret: bytes, max_frame: int
) -> str | None:
    """Authenticate a connecting peer; returns its node id, or None (connection closed)."""
    nonce = new_nonce()
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await ws.send_message(f.encode(f.Challenge(nonce)))
            answer: f.Answer = await _receive_frame(ws, max_frame, f.Answer)
            if not verify(client_mac(secret, nonce, answer.nonce, answer.node_id), answer.mac):
                await ws.aclose(code=1008, reason="authentication failed")
                return None
            proof = server_mac(secret, answer.nonce, nonce, local_id)
            await ws.send_message(f.encode(f.Proof(local_id, proof)))
            return answer.node_id
    except trio.TooSlowError:
        await ws.aclose(code=1008, reason="handshake timed out")
    except f.FrameError as exc:
        await ws.aclose(code=exc.close_code, reason=str(exc)[:120])
    except trio_websocket.ConnectionClosed:
        pass
    return None


async def client_handshake(
    ws: trio_websocket.WebSocketConnection, local_id: str, secret: bytes, max_frame: int
) -> str:
    """Authenticate to a server; returns its node id.

    Raises:
        PeerAuthFailed: the server refused us, or could not prove it knows the secret.
    """
    nonce = new_nonce()
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            challenge: f.Challenge = await _receive_frame(ws, max_frame, f.Challenge)
            mac = client_mac(secret, challenge.nonce, nonce, local_id)
            await ws.send_message(f.encode(f.Answer(local_id, nonce, mac)))
            proof: f.Proof = await _receive_frame(ws, max_frame, f.Proof)
    except (trio.TooSlowError, f.FrameError, trio_websocket.ConnectionClosed) as exc:
        raise PeerAuthFailed(f"handshake failed: {exc!r}") from None
    if not verify(server_mac(secret, nonce, challenge.nonce, proof.node_id), proof.mac):
        await ws.aclose(code=1008, reason="server proof invalid")
        raise PeerAuthFailed("the server could not prove it knows the cluster secret")
    return proof.node_id


async def serve_peers(
    local_id: str,
    secret: bytes,
    handlers: Mapping[str, Handler],
    host: str,
    port: int,
    *,
    max_frame: int = f.MAX_FRAME,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the peer endpoint on ``host:port`` (0: a free port, reported by ``started``)."""

    async def on_connect(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        remote = await server_handshake(ws, local_id, secret, max_frame)
        if remote is None:
            return
        await PeerSession(ws, remote, handlers, max_frame=max_frame).run()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: trio_websocket.serve_websocket(
                on_connect,
                host,
                port,
                None,
                handler_nursery=nursery,
                max_message_size=max_frame,
                message_queue_size=64,
                receive_buffer_size=256 * 1024,
                connect_timeout=HANDSHAKE_TIMEOUT,
                disconnect_timeout=HANDSHAKE_TIMEOUT,
                task_status=task_status,
            )
        )
        task_status.started(server.port)


class PeerPool:
    """One client session per peer address, opened on first use, reopened after a break."""

    def __init__(
        self,
        nursery: trio.Nursery,
        local_id: str,
        secret: bytes,
        handlers: Mapping[str, Handler] | None = None,
        *,
        max_frame: int = f.MAX_FRAME,
    ) -> None:
        self._nursery = nursery
        self._local_id = local_id
        self._secret = secret
        self._handlers = handlers or {}
        self._max_frame = max_frame
        self._sessions: dict[str, PeerSession] = {}
        self._connecting: dict[str, trio.Event] = {}
        self._failed_at: dict[str, float] = {}

    async def request(self, addr: str, method: str, payload: Any, *, timeout: float = 5.0) -> Any:
        """Send ``method(payload)`` to the peer at ``addr`` (``host:port``) and return the
        answer. Raises :class:`PeerUnreachable`, :class:`RemoteError`, :class:`PeerAuthFailed`."""
        with trio.move_on_after(timeout) as scope:
            session = await self._session(addr)
        if scope.cancelled_caught:
            raise PeerUnreachable(f"could not connect to {addr} within {timeout}s")
        return await session.request(method, payload, timeout=timeout)

    async def send(self, addr: str, method: str, payload: Any) -> None:
        """Send a one-way message to the peer at ``addr``."""
        session = await self._session(addr)
        await session.notify(method, payload)

    async def _session(self, addr: str) -> PeerSession:
        while True:
            session = self._sessions.get(addr)
            if session is not None and not session.closed:
                return session
            pending = self._connecting.get(addr)
            if pending is None:
                break
            await pending.wait()
        since = trio.current_time() - self._failed_at.get(addr, -1e9)
        if since < RECONNECT_BACKOFF:
            await trio.sleep(RECONNECT_BACKOFF - since)
        self._connecting[addr] = done = trio.Event()
        try:
            return await self._connect(addr)
        except BaseException:
            self._failed_at[addr] = trio.current_time()
            raise
        finally:
            del self._connecting[addr]
            done.set()

    async def _connect(self, addr: str) -> PeerSession:
        session: PeerSession = await self._nursery.start(self._run_session, addr)
        return session

    async def _run_session(self, addr: str, task_status: trio.TaskStatus[PeerSession]) -> None:
        """Own one client connection for its whole life (``open_websocket`` closes it)."""
        host, _, port = addr.rpartition(":")
        try:
            async with trio_websocket.open_websocket(
                host.strip("[]"),
                int(port),
                "/",
                use_ssl=False,
                max_message_size=self._max_frame,
                message_queue_size=64,
                receive_buffer_size=256 * 1024,
                connect_timeout=HANDSHAKE_TIMEOUT,
                disconnect_timeout=1.0,
            ) as ws:
                remote = await client_handshake(ws, self._local_id, self._secret, self._max_frame)
                session = PeerSession(ws, remote, self._handlers, max_frame=self._max_frame)
                self._sessions[addr] = session
                task_status.started(session)
                try:
                    await session.run()
                finally:
                    if self._sessions.get(addr) is session:
                        del self._sessions[addr]
        except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionTimeout) as exc:
            raise PeerUnreachable(f"cannot connect to {addr}: {exc!r}") from None
        except trio_websocket.ConnectionClosed:
            pass

    async def aclose(self) -> None:
        for session in list(self._sessions.values()):
            await session._ws.aclose()
        self._sessions.clear()
