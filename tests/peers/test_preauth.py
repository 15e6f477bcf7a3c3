"""Unauthenticated connections cannot make a node hold memory or lock peers out.

The peer endpoint runs in a process of its own (its RSS is its own); 1,000 loopback
connections each complete the websocket upgrade and start a message announcing 16 MiB, of
which they send 256 KiB. Before the pre-authentication limits that cost the server ~280 MB
(benchmarks/preauth.py); now every such connection is closed after 1 KiB. A legitimate peer
is then answered at once.
"""

from __future__ import annotations

import resource
import secrets
import struct
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from clusterkit._peers.transport import PeerPool, serve_peers

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"preauth-test-secret-32-bytes-xyz"
CONNECTIONS = 1000
PAYLOAD = 256 * 1024

SERVER = """
import sys, trio
sys.path.insert(0, sys.argv[1])
from clusterkit._peers.transport import serve_peers

async def ping(payload):
    return payload

async def main():
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_peers(
                "victim", sys.argv[2].encode(), {"ping": ping}, "127.0.0.1", 0,
                max_frame=16 * 1024 * 1024, task_status=task_status,
            )
        )
        print(port, flush=True)

trio.run(main)
"""

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}: did the server die?")


async def _partial_message(port: int, held: list[trio.SocketStream]) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    held.append(stream)
    try:
        await stream.send_all(UPGRADE)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return "closed before the upgrade"
            answer += chunk
        header = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 16 << 20) + secrets.token_bytes(4)
        await stream.send_all(header + bytes(PAYLOAD))
    except (trio.BrokenResourceError, OSError):
        return "closed mid-message"
    return "held"


@pytest.mark.slow
async def test_a_thousand_partial_messages_before_the_handshake_cost_little() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 3 * CONNECTIONS:
        pytest.skip(f"needs {3 * CONNECTIONS} file descriptors (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 3 * CONNECTIONS), hard))
    server = await trio.lowlevel.open_process(
        [sys.executable, "-c", SERVER, str(ROOT), SECRET.decode()], stdout=subprocess.PIPE
    )
    held: list[trio.SocketStream] = []
    try:
        assert server.stdout is not None
        with trio.fail_after(30):
            line = b""
            while not line.endswith(b"\n"):
                line += await server.stdout.receive_some(64)
        port = int(line)
        before = _rss_mb(server.pid)
        outcomes: dict[str, int] = {}

        async def one() -> None:
            outcome = await _partial_message(port, held)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(CONNECTIONS):
                    nursery.start_soon(one)
        grown = _rss_mb(server.pid) - before
        async with trio.open_nursery() as nursery:
            pool = PeerPool(nursery, "legit", SECRET)
            started = time.monotonic()
            with trio.fail_after(1.0):  # while all 1,000 sockets are still held open
                assert await pool.request(f"127.0.0.1:{port}", "ping", b"hi") == b"hi"
            took = time.monotonic() - started
            await pool.aclose()
        assert grown < 100, f"server RSS grew by {grown:.1f} MB ({outcomes})"
        assert took < 1.0
    finally:
        for stream in held:
            await trio.aclose_forcefully(stream)
        server.kill()
        with trio.CancelScope(shield=True):
            await server.wait()


async def _echo(payload: object) -> object:
    return payload


async def _serve(nursery: trio.Nursery, **limits: Any) -> int:
    """An in-process peer endpoint answering ``ping``; returns its port."""
    port: int = await nursery.start(
        partial(serve_peers, "victim", SECRET, {"ping": _echo}, "127.0.0.1", 0, **limits)
    )
    return port


async def test_silent_connections_at_the_bound_make_room_for_a_real_peer() -> None:
    """At ``max_pending`` unauthenticated connections, each new one closes the oldest: memory
    stays bounded and a peer whose handshake takes milliseconds still gets in."""

    stats: dict[str, int] = {}
    held: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, max_pending=4, stats=stats)
        try:
            for _ in range(10):  # upgrade, then silence
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                held.append(stream)
                await stream.send_all(UPGRADE)
            with trio.fail_after(5):
                while stats.get("dropped", 0) < 6:
                    await trio.sleep(0.01)
            assert stats["pending"] <= 4
            pool = PeerPool(nursery, "legit", SECRET)
            with trio.fail_after(2):
                assert await pool.request(f"127.0.0.1:{port}", "ping", b"hi") == b"hi"
            await pool.aclose()
            assert stats["pending"] <= 4
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


async def test_a_peer_that_keeps_sending_while_we_close_cannot_take_the_server_down() -> None:
    """trio-websocket's reader raises (wsproto LocalProtocolError) when an oversized message
    arrives on a connection it is already closing; that used to escape into the server's
    nursery and stop the node's peer endpoint. Now it ends that connection alone."""

    stats: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, max_pending=1, stats=stats)
        hostile = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            with trio.fail_after(10):
                await hostile.send_all(UPGRADE)
                seen = b""
                while b"\r\n\r\n" not in seen:
                    seen += await hostile.receive_some(4096)
                # A second connection evicts the first (max_pending=1): the server closes it.
                second = await trio.open_tcp_stream("127.0.0.1", port)
                await second.send_all(UPGRADE)
                while b"\x88" not in seen.split(b"\r\n\r\n", 1)[1]:  # the server's Close frame
                    seen += await hostile.receive_some(4096)
                # ... and we keep talking: a 2 KiB message, over the pre-auth limit.
                frame = bytes([0x82, 0x80 | 126]) + struct.pack("!H", 2048) + bytes(4)
                await hostile.send_all(frame + bytes(2048))
                while stats.get("errors", 0) == 0:
                    await trio.sleep(0.01)
                await trio.aclose_forcefully(second)
                pool = PeerPool(nursery, "legit", SECRET)
                assert await pool.request(f"127.0.0.1:{port}", "ping", b"ok") == b"ok"
                await pool.aclose()
        finally:
            await trio.aclose_forcefully(hostile)
            nursery.cancel_scope.cancel()
