"""Peer sessions on loopback: handshake, requests, errors, hostile peers."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgpack
import pytest
import trio
import trio_websocket
from raw_websocket import open_raw_websocket
from tcp_proxy import open_proxy

from clusterkit._peers import frames as f
from clusterkit._peers.handshake import client_mac, new_nonce
from clusterkit._peers.transport import (
    PeerAuthFailed,
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
reached: list[Any] = []


async def echo(payload: Any) -> Any:
    reached.append(payload)
    return {"echo": payload}


async def boom(payload: Any) -> Any:
    raise ValueError(f"bad {payload}")


async def slow(payload: Any) -> Any:
    await trio.sleep_forever()


HANDLERS = {"echo": echo, "boom": boom, "slow": slow}


def _bytes(message: str | bytes) -> bytes:
    return message.encode() if isinstance(message, str) else message


@asynccontextmanager
async def server(**kwargs: Any) -> AsyncIterator[tuple[str, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(serve_peers, "srv", SECRET, HANDLERS, "127.0.0.1", 0, **kwargs)
        )
        yield f"127.0.0.1:{port}", nursery
        nursery.cancel_scope.cancel()


async def test_requests_errors_and_many_in_flight() -> None:
    async with server() as (addr, nursery):
        pool = PeerPool(nursery, "cli", SECRET)
        assert await pool.request(addr, "echo", [1, "x", b"y"]) == {"echo": [1, "x", b"y"]}
        with pytest.raises(RemoteError) as info:
            await pool.request(addr, "boom", 7)
        assert (info.value.remote_type, info.value.remote_message) == ("ValueError", "bad 7")
        with pytest.raises(RemoteError, match="UnknownMethod"):
            await pool.request(addr, "nope", None)
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await pool.request(addr, "echo", i)

        async with trio.open_nursery() as inner:
            for i in range(200):
                inner.start_soon(one, i)
        assert results == {i: {"echo": i} for i in range(200)}
        assert len(pool._sessions) == 1  # all on one connection
        await pool.aclose()


async def test_wrong_secret_never_reaches_a_handler() -> None:
    reached.clear()
    async with server() as (addr, nursery):
        pool = PeerPool(nursery, "intruder", b"wrong-secret")
        with pytest.raises(PeerAuthFailed):
            await pool.request(addr, "echo", "let me in")
    assert reached == []


@pytest.mark.parametrize(
    "garbage",
    [b"\xc1not msgpack", msgpack.packb([99, 1]), msgpack.packb([0, 1, "echo"]), b"x" * 2000],
    ids=["not-msgpack", "unknown-kind", "short-request", "too-big"],
)
async def test_hostile_frames_close_that_connection_not_the_node(garbage: bytes) -> None:
    reached.clear()
    async with server(max_frame=1024) as (addr, nursery):
        async with open_raw_websocket(addr) as ws:
            challenge = f.decode(_bytes(await ws.get_message()))
            assert isinstance(challenge, f.Challenge)
            nonce = new_nonce()
            mac = client_mac(SECRET, challenge.nonce, nonce, "cli")
            await ws.send_message(f.encode(f.Answer("cli", nonce, mac)))
            assert isinstance(f.decode(_bytes(await ws.get_message())), f.Proof)
            await ws.send_message(garbage)
            with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason is not None and info.value.reason.code in (1002, 1009)
        # The node still serves others.
        pool = PeerPool(nursery, "ok", SECRET)
        assert await pool.request(addr, "echo", 1) == {"echo": 1}
    assert reached == [1]


async def test_garbage_before_the_handshake_and_silence_are_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with server() as (addr, _):
        async with open_raw_websocket(addr) as ws:
            await ws.get_message()  # the challenge
            # say nothing: the server gives up after the handshake timeout
            with trio.fail_after(30), pytest.raises(trio_websocket.ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason is not None and info.value.reason.code == 1008


async def test_pending_requests_fail_when_the_peer_goes_away() -> None:
    async with trio.open_nursery() as outer:
        srv_scope = trio.CancelScope()

        async def run_server(task_status: trio.TaskStatus[int]) -> None:
            with srv_scope:
                await serve_peers("srv", SECRET, HANDLERS, "127.0.0.1", 0, task_status=task_status)

        port = await outer.start(run_server)
        addr = f"127.0.0.1:{port}"
        pool = PeerPool(outer, "cli", SECRET)
        assert await pool.request(addr, "echo", 0) == {"echo": 0}

        async def kill_soon() -> None:
            await trio.sleep(0.2)
            srv_scope.cancel()

        outer.start_soon(kill_soon)
        with trio.fail_after(10), pytest.raises(PeerUnreachable):
            await pool.request(addr, "slow", None, timeout=8)
        with pytest.raises(PeerUnreachable):
            await pool.request(addr, "echo", 1, timeout=1)
        outer.cancel_scope.cancel()


async def test_concurrent_callers_share_one_attempt_and_fail_fast_after_it() -> None:
    accepted = 0

    async def close_at_once(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, close_at_once, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        pool = PeerPool(nursery, "client", SECRET, connect_timeout=0.5, reconnect_backoff=60)
        failures: list[BaseException] = []

        async def call() -> None:
            try:
                await pool.request(f"127.0.0.1:{port}", "echo", 1, timeout=5)
            except PeerUnreachable as exc:
                failures.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as callers:
                for _ in range(20):
                    callers.start_soon(call)
        assert len(failures) == 20
        assert accepted == 1  # one dial for all twenty callers
        with pytest.raises(PeerUnreachable):  # within the backoff: no new dial
            await pool.request(f"127.0.0.1:{port}", "echo", 1, timeout=5)
        assert accepted == 1
        nursery.cancel_scope.cancel()


async def test_a_frozen_peer_fails_pending_calls_after_the_ping_timeout() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_peers, "server", SECRET, HANDLERS, "127.0.0.1", 0))
        async with open_proxy(f"127.0.0.1:{port}") as proxy:
            pool = PeerPool(nursery, "client", SECRET, ping_interval=0.1, ping_timeout=0.3)
            with trio.fail_after(10):
                assert await pool.request(proxy.endpoint, "echo", 1) == {"echo": 1}
                proxy.freeze()  # the connection stays open, but nothing gets through
                with pytest.raises(PeerUnreachable, match="closed"):
                    await pool.request(proxy.endpoint, "echo", 2, timeout=60)
                proxy.thaw()
                # the next call dials a fresh connection
                assert await pool.request(proxy.endpoint, "echo", 3) == {"echo": 3}
            assert proxy.connections == 2
            await pool.aclose()
        nursery.cancel_scope.cancel()


async def test_peers_that_never_answer_our_close_are_dropped_anyway(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Silent or garbage-sending clients that never reply to the server's Close must not hold
    their connection (and a task) forever."""
    async with server() as (addr, _):
        host, _, port = addr.rpartition(":")
        raw: list[trio.SocketStream] = []
        for i in range(6):
            stream = await trio.open_tcp_stream(host, int(port))
            key = "dGhlIHNhbXBsZSBub25jZQ=="
            await stream.send_all(
                f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            if i % 2:  # one masked garbage frame, then silence
                await stream.send_all(bytes([0x82, 0x80 | 3]) + b"\0\0\0\0" + b"abc")
            raw.append(stream)
        with trio.fail_after(60):
            for stream in raw:  # the server closes the TCP connection: we read EOF
                while await stream.receive_some(65536):
                    pass
        for stream in raw:
            await stream.aclose()


async def test_a_failed_authentication_stays_typed_for_callers_within_the_backoff() -> None:
    async with server() as (addr, nursery):
        pool = PeerPool(
            nursery, "client", b"not-the-cluster-secret-at-all-32", reconnect_backoff=60
        )
        with trio.fail_after(10):
            for _ in range(3):  # the dial, then two fail-fast calls
                with pytest.raises(PeerAuthFailed):
                    await pool.request(addr, "echo", 1)
        assert pool.connects == 0


async def test_a_request_flood_is_refused_beyond_the_queue_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from clusterkit._peers import session as session_module

    monkeypatch.setattr(session_module, "MAX_WAITING", 8)
    release = trio.Event()
    started = 0

    async def block(payload: Any) -> Any:
        nonlocal started
        started += 1
        await release.wait()
        return payload

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(serve_peers, "server", SECRET, {"block": block}, "127.0.0.1", 0)
        )
        pool = PeerPool(nursery, "client", SECRET)
        answers: list[Any] = []
        refused: list[RemoteError] = []

        async def call(i: int) -> None:
            try:
                answers.append(await pool.request(f"127.0.0.1:{port}", "block", i, timeout=30))
            except RemoteError as exc:
                refused.append(exc)

        total = session_module.MAX_CONCURRENT + 8 + 20
        with trio.fail_after(30):
            async with trio.open_nursery() as callers:
                for i in range(total):
                    callers.start_soon(call, i)
                while len(refused) < 20:  # the 20 beyond running + queued are refused at once
                    await trio.sleep(0.01)
                assert started == session_module.MAX_CONCURRENT
                release.set()
        assert len(answers) == total - 20
        assert {e.remote_type for e in refused} == {"Overloaded"}
        await pool.aclose()
        nursery.cancel_scope.cancel()
