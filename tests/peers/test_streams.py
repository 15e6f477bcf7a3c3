"""Peer streams, batching and hostile stream frames, over ``serve_peers`` + ``PeerPool`` on
loopback.

Flow control is observed, not timed: a producer's count is read once every task is blocked
(``trio.testing.wait_all_tasks_blocked``; loopback sends land in the peer's socket buffer
before ``send`` returns, so "all blocked" also means "nothing left in flight").
"""

from __future__ import annotations

import gc
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.events as wse
from raw_websocket import open_raw_websocket

from clusterkit._peers import frames as f
from clusterkit._peers import session as peer_session
from clusterkit._peers.handshake import client_mac, new_nonce
from clusterkit._peers.service import Peers
from clusterkit._peers.session import STREAM_WINDOW, PeerSession, PeerStream, StreamHandler
from clusterkit._peers.transport import (
    PeerPool,
    PeerUnreachable,
    RemoteError,
    serve_peers,
)

# A socket left to the garbage collector is a leak: collect inside each test, so a
# ResourceWarning fails the test that caused it (filterwarnings = error).


@pytest.fixture(autouse=True)
def _collect_sockets_inside_the_test() -> Iterator[None]:
    yield
    gc.collect()


SECRET = b"cluster-secret-for-tests-only-32"
HALF = STREAM_WINDOW // 2


class Server:
    """What the server's handlers saw."""

    def __init__(self, addr: str, nursery: trio.Nursery, sessions: set[PeerSession]) -> None:
        self.addr = addr
        self.nursery = nursery
        self.sessions = sessions
        self.requests: list[Any] = []


@asynccontextmanager
async def server(stream_handlers: dict[str, StreamHandler]) -> AsyncIterator[Server]:
    sessions: set[PeerSession] = set()
    seen: list[Any] = []

    async def echo(payload: Any) -> Any:
        seen.append(payload)
        return payload

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(
                serve_peers,
                "srv",
                SECRET,
                {"echo": echo},
                "127.0.0.1",
                0,
                stream_handlers=stream_handlers,
                sessions=sessions,
            )
        )
        srv = Server(f"127.0.0.1:{port}", nursery, sessions)
        srv.requests = seen
        yield srv
        nursery.cancel_scope.cancel()


async def quiet() -> None:
    """Return once every other task is blocked (and loopback data has been read)."""
    with trio.fail_after(5):
        await trio.testing.wait_all_tasks_blocked()


async def wait_until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.testing.wait_all_tasks_blocked()
            if not condition():
                await trio.sleep(0.001)


def _bytes(message: str | bytes) -> bytes:
    return message.encode() if isinstance(message, str) else message


@asynccontextmanager
async def hostile(addr: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A websocket that passed the handshake as node "evil" and then sends what it likes."""
    async with open_raw_websocket(addr) as ws:
        challenge = f.decode(_bytes(await ws.get_message()))
        assert isinstance(challenge, f.Challenge)
        nonce = new_nonce()
        mac = client_mac(SECRET, challenge.nonce, nonce, "evil")
        await ws.send_message(f.encode(f.Answer("evil", nonce, mac)))
        assert isinstance(f.decode(_bytes(await ws.get_message())), f.Proof)
        yield ws


async def closed_with(ws: trio_websocket.WebSocketConnection) -> int:
    """Read until the server closes the connection; its close code."""
    with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as info:
        while True:
            await ws.get_message()
    assert info.value.reason is not None
    code: int = info.value.reason.code
    return code


# -- streams between well-behaved peers ----------------------------------------------------


async def test_items_flow_both_ways_past_the_window() -> None:
    async def scale(stream: PeerStream, factor: Any) -> None:
        async for item in stream:
            await stream.send(item * factor)

    count = 5 * STREAM_WINDOW
    async with server({"scale": scale}) as srv:
        pool = PeerPool(srv.nursery, "cli", SECRET)
        stream = await pool.open_stream(srv.addr, "scale", 3)
        got: list[int] = []

        async def produce() -> None:
            for i in range(count):
                await stream.send(i)
            await stream.end()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                got.extend([item async for item in stream])
        assert got == [3 * i for i in range(count)]
        assert stream.remote_id == "srv" and stream.id % 2 == 1
        await pool.aclose()


async def test_a_slow_consumer_bounds_the_producer() -> None:
    produced: list[int] = []

    async def endless(stream: PeerStream, payload: Any) -> None:
        i = 0
        while True:
            await stream.send(i)
            produced.append(i)
            i += 1

    async with server({"endless": endless}) as srv:
        pool = PeerPool(srv.nursery, "cli", SECRET)
        stream = await pool.open_stream(srv.addr, "endless", None)
        await wait_until(lambda: len(produced) >= STREAM_WINDOW)
        await quiet()
        # The producer is parked in send(): exactly one window is out, all of it unread here.
        assert len(produced) == STREAM_WINDOW
        assert len(stream._inbox) == STREAM_WINDOW
        # Consuming less than half a window grants nothing yet.
        assert [await stream.receive() for _ in range(HALF - 1)] == list(range(HALF - 1))
        await quiet()
        assert len(produced) == STREAM_WINDOW
        # The half-window-th item grants HALF more credit, and the producer uses exactly it.
        assert await stream.receive() == HALF - 1
        await wait_until(lambda: len(produced) >= STREAM_WINDOW + HALF)
        await quiet()
        assert len(produced) == STREAM_WINDOW + HALF
        assert len(stream._inbox) == STREAM_WINDOW
        await stream.abort()
        await pool.aclose()


async def test_end_half_closes_one_direction() -> None:
    async def count(stream: PeerStream, payload: Any) -> None:
        items = [item async for item in stream]  # until the opener's end()
        await stream.send(len(items))
        await stream.send(items[-1])
        # returning ends this direction

    async with server({"count": count}) as srv:
        pool = PeerPool(srv.nursery, "cli", SECRET)
        stream = await pool.open_stream(srv.addr, "count", None)
        for i in range(10):
            await stream.send(i)
        await stream.end()
        await stream.end()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await stream.send(10)
        with trio.fail_after(5):
            assert await stream.receive() == 10
            assert await stream.receive() == 9
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()
        # Both directions ended: both sides forgot the stream.
        (session,) = pool._sessions.values()
        assert session.streams == {}
        await wait_until(lambda: all(s.streams == {} for s in srv.sessions))
        await pool.aclose()


async def test_a_raising_stream_handler_aborts_the_stream() -> None:
    async def picky(stream: PeerStream, payload: Any) -> None:
        await stream.send("ready")
        item = await stream.receive()
        raise ValueError(f"cannot take {item!r}")

    async with server({"picky": picky}) as srv:
        pool = PeerPool(srv.nursery, "cli", SECRET)
        stream = await pool.open_stream(srv.addr, "picky", None)
        with trio.fail_after(5):
            assert await stream.receive() == "ready"
            await stream.send(7)
            with pytest.raises(RemoteError) as info:
                await stream.receive()
        assert (info.value.remote_type, info.value.remote_message) == (
            "ValueError",
            "cannot take 7",
        )
        with pytest.raises(RemoteError):
            await stream.send(8)
        # The connection itself is fine.
        assert await pool.request(srv.addr, "echo", 1) == 1
        await pool.aclose()


async def test_an_unknown_stream_method_is_refused() -> None:
    async with server({}) as srv:
        pool = PeerPool(srv.nursery, "cli", SECRET)
        stream = await pool.open_stream(srv.addr, "nope", None)
        with trio.fail_after(5), pytest.raises(RemoteError) as info:
            await stream.receive()
        assert (info.value.remote_type, info.value.remote_message) == ("UnknownMethod", "nope")
        await pool.aclose()


@pytest.mark.parametrize("how", ["return", "cancel"])
async def test_leaving_the_stream_block_early_aborts_the_remote_side(how: str) -> None:
    outcome: list[BaseException] = []
    received: list[Any] = []
    done = trio.Event()

    async def listen(stream: PeerStream, payload: Any) -> None:
        try:
            async for item in stream:
                received.append(item)
        except RemoteError as exc:
            outcome.append(exc)
            raise
        finally:
            done.set()

    async with server({"listen": listen}) as srv:
        pool = PeerPool(srv.nursery, "cli", SECRET)
        peers = Peers(
            pool, lambda node_id: None, address="", timeout=5, handlers={}, stream_handlers={}
        )
        with trio.CancelScope() as scope:
            async with peers.stream(srv.addr, "listen") as stream:
                await stream.send("hello")
                if how == "cancel":
                    scope.cancel()
                    await stream.receive()  # cancelled: the abort still goes out
        with trio.fail_after(5):
            await done.wait()
        assert received == ["hello"]
        (exc,) = outcome
        assert isinstance(exc, RemoteError)
        assert (exc.remote_type, exc.remote_message) == ("Cancelled", "stream aborted")
        (session,) = pool._sessions.values()
        assert session.streams == {}
        with pytest.raises(PeerUnreachable):
            await stream.send("late")
        await pool.aclose()


async def test_connection_loss_fails_open_streams() -> None:
    opened = trio.Event()
    handler_cancelled = trio.Event()

    async def hold(stream: PeerStream, payload: Any) -> None:
        opened.set()
        try:
            await trio.sleep_forever()
        finally:
            handler_cancelled.set()

    async with trio.open_nursery() as outer:
        with trio.CancelScope() as server_scope:
            async with server({"hold": hold}) as srv:
                pool = PeerPool(outer, "cli", SECRET)
                stream = await pool.open_stream(srv.addr, "hold", None)
                with trio.fail_after(5):
                    await opened.wait()
                server_scope.cancel()
        with trio.fail_after(5):
            with pytest.raises(PeerUnreachable):
                await stream.receive()
            await handler_cancelled.wait()
        with pytest.raises(PeerUnreachable):
            await stream.send(1)
        await stream.end()  # no-ops on a failed stream
        await stream.abort()
        outer.cancel_scope.cancel()


async def test_many_small_requests_are_batched_and_all_answered() -> None:
    async with server({}) as srv:
        pool = PeerPool(srv.nursery, "cli", SECRET)
        assert await pool.request(srv.addr, "echo", -1) == -1
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await pool.request(srv.addr, "echo", i)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(1000):
                    nursery.start_soon(one, i)
        assert results == {i: i for i in range(1000)}
        (client,) = pool._sessions.values()
        (served,) = srv.sessions
        # Both writers sent fewer websocket messages than frames.
        assert client.frames_sent == served.frames_sent == 1001
        assert client.messages_sent < 1001 and served.messages_sent < 1001
        await pool.aclose()


# -- hostile peers -------------------------------------------------------------------------


async def test_items_beyond_the_granted_credit_close_the_connection() -> None:
    consumed = trio.Event()
    reached: list[Any] = []

    async def slow(stream: PeerStream, payload: Any) -> None:
        for _ in range(HALF - 1):  # not enough to grant credit
            reached.append(await stream.receive())
        consumed.set()
        await trio.sleep_forever()

    async with server({"slow": slow}) as srv:
        async with hostile(srv.addr) as ws:
            items = [f.encode(f.StreamItem(1, i)) for i in range(STREAM_WINDOW)]
            await ws.send_message(f.encode(f.StreamOpen(1, "slow", None)))
            await ws.send_message(f.encode(f.Batch(tuple(items))))  # exactly the window
            with trio.fail_after(5):
                await consumed.wait()
            # Only HALF - 1 items wait in the server's inbox now, but no credit came back.
            await ws.send_message(f.encode(f.StreamItem(1, "one too many")))
            assert await closed_with(ws) == 1002
        assert reached == list(range(HALF - 1))
        # The node still serves others.
        pool = PeerPool(srv.nursery, "ok", SECRET)
        assert await pool.request(srv.addr, "echo", 1) == 1
        await pool.aclose()


@pytest.mark.parametrize(
    "frame",
    [
        f.StreamOpen(2, "slow", None),  # a dialing peer's stream ids are odd
        f.Batch((f.encode(f.Batch((f.encode(f.Request(1, "echo", "nested")),))),)),
        f.Challenge(bytes(32)),  # a handshake frame after the handshake
    ],
    ids=["stream-id-parity", "batch-in-batch", "late-handshake"],
)
async def test_protocol_violations_close_that_connection_only(frame: f.Frame) -> None:
    reached: list[Any] = []

    async def slow(stream: PeerStream, payload: Any) -> None:
        reached.append(payload)

    async with server({"slow": slow}) as srv:
        async with hostile(srv.addr) as ws:
            await ws.send_message(f.encode(frame))
            assert await closed_with(ws) == 1002
        pool = PeerPool(srv.nursery, "ok", SECRET)
        assert await pool.request(srv.addr, "echo", "fine") == "fine"
        await pool.aclose()
        assert reached == []
        assert srv.requests == ["fine"]


async def test_a_second_open_of_a_live_stream_id_closes_the_connection() -> None:
    async def hold(stream: PeerStream, payload: Any) -> None:
        await trio.sleep_forever()

    async with server({"hold": hold}) as srv:
        async with hostile(srv.addr) as ws:
            await ws.send_message(f.encode(f.StreamOpen(1, "hold", None)))
            await ws.send_message(f.encode(f.StreamOpen(1, "hold", None)))
            assert await closed_with(ws) == 1002


async def test_a_peer_that_ignores_the_close_handshake_is_cut_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a protocol error the server sends Close; a peer that never answers it has its
    socket shut after ``CLOSE_TIMEOUT`` instead of holding the connection forever."""
    monkeypatch.setattr(peer_session, "CLOSE_TIMEOUT", 0.2)
    async with server({}) as srv:
        host, _, port = srv.addr.rpartition(":")
        tcp = await trio.open_tcp_stream(host, int(port))
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        buffered: list[wse.Event] = []

        async def next_event() -> wse.Event:
            while not buffered:
                data = await tcp.receive_some(65536)
                ws.receive_data(data or None)
                buffered.extend(ws.events())
            return buffered.pop(0)

        with trio.fail_after(5):
            await tcp.send_all(ws.send(wse.Request(host=host, target="/")))
            assert isinstance(await next_event(), wse.AcceptConnection)
            challenge = await next_event()
            assert isinstance(challenge, wse.BytesMessage)
            server_nonce = f.decode(bytes(challenge.data))
            assert isinstance(server_nonce, f.Challenge)
            nonce = new_nonce()
            mac = client_mac(SECRET, server_nonce.nonce, nonce, "mute")
            answer = f.encode(f.Answer("mute", nonce, mac))
            await tcp.send_all(ws.send(wse.BytesMessage(data=answer)))
            assert isinstance(await next_event(), wse.BytesMessage)  # the proof
            await tcp.send_all(ws.send(wse.BytesMessage(data=b"\xc1 not a frame")))
            close = await next_event()
            assert isinstance(close, wse.CloseConnection) and close.code == 1002
            # Do not answer the close; the server must still let go of the socket.
            while await tcp.receive_some(65536):
                pass
        await tcp.aclose()
        pool = PeerPool(srv.nursery, "ok", SECRET)
        assert await pool.request(srv.addr, "echo", 1) == 1
        await pool.aclose()


async def test_a_client_that_resets_during_the_upgrade_does_not_stop_the_server() -> None:
    """The server's ``accept()`` fails when the client is already gone."""
    upgrade = (
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    async with server({}) as srv:
        host, _, port = srv.addr.rpartition(":")
        for _ in range(5):
            sock = trio.socket.socket()
            await sock.connect((host, int(port)))
            await sock.send(upgrade)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST: the server's 101 answer hits a reset socket
        await quiet()
        pool = PeerPool(srv.nursery, "ok", SECRET)
        assert await pool.request(srv.addr, "echo", 1) == 1
        await pool.aclose()


async def test_error_types_longer_than_the_wire_limit_are_cut() -> None:
    long_name = "E" * 300
    error_class = type(long_name, (Exception,), {})

    async def fail(payload: Any) -> Any:
        raise error_class("long")

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(serve_peers, "srv", SECRET, {"fail": fail}, "127.0.0.1", 0)
        )
        pool = PeerPool(nursery, "cli", SECRET)
        with pytest.raises(RemoteError) as info:
            await pool.request(f"127.0.0.1:{port}", "fail", None)
        assert info.value.remote_type == "E" * 256
        with pytest.raises(RemoteError):
            await pool.request(f"127.0.0.1:{port}", "fail", None)
        assert pool.connects == 1  # the connection survived both
        await pool.aclose()
        nursery.cancel_scope.cancel()


async def test_closing_the_pool_completes_the_close_handshake() -> None:
    """``PeerPool.aclose()`` waits for the server's answer to its Close frame; the pool's
    connection task must not cut trio-websocket's reader off before that answer is read
    (it used to, about every other time, and ``aclose()`` then sat out its 1 s cap)."""
    async with server({}) as srv:
        for i in range(6):
            pool = PeerPool(srv.nursery, f"cli{i}", SECRET)
            assert await pool.request(srv.addr, "echo", i) == i
            started = trio.current_time()
            await pool.aclose()
            assert trio.current_time() - started < 0.5


async def test_cancelling_live_connections_is_prompt() -> None:
    """When the pool's nursery is cancelled (a node shutting down), its connection tasks do
    not wait for a close handshake that trio-websocket's cancelled reader cannot finish."""

    async def echo(payload: Any) -> Any:
        return payload

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(serve_peers, "srv", SECRET, {"echo": echo}, "127.0.0.1", 0)
        )
        pool = PeerPool(nursery, "cli", SECRET)
        await pool.request(f"127.0.0.1:{port}", "echo", 0)
        started = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started < 0.5
