"""Peers of a clusterkit.testing cluster talk over an in-process network, in virtual time."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

import clusterkit
from clusterkit._peers.memory import MemoryNetwork, socket_pair
from clusterkit.testing import open_test_cluster


async def test_a_socket_pair_carries_messages_and_closes_both_ends() -> None:
    a, b = socket_pair()
    await a.send_message(b"hi")
    await b.send_message("there")
    assert await b.get_message() == b"hi"
    assert await a.get_message() == b"there"
    await b.aclose(1008, "go away")
    with pytest.raises(ConnectionClosed) as info:
        await a.get_message()
    assert info.value.reason is not None and info.value.reason.code == 1008
    with pytest.raises(ConnectionClosed):
        await a.send_message(b"late")
    with pytest.raises(ConnectionClosed):
        await b.ping()


async def test_nothing_serves_an_unknown_address() -> None:
    with pytest.raises(OSError):
        await MemoryNetwork().connect("127.0.0.1:1")


async def test_test_cluster_peers_request_stream_and_migrate_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(partitions=4, replica_factor=2, session_ttl=2.0) as cluster:
        a = await cluster.start("a")
        b = await cluster.start("b")
        await cluster.wait_converged()

        async def slow_echo(payload: Any) -> Any:
            await trio.sleep(30)  # virtual: costs no real time
            return payload

        b.ck.peers.add_handler("echo", slow_echo)

        @b.ck.peers.stream_handler("count")
        async def count(stream: clusterkit.PeerStream, upto: int) -> None:
            for i in range(upto):
                await stream.send(i)

        @b.ck.migration.source
        async def source(req: clusterkit.SourceRequest) -> Any:
            for i in range(250):
                key = b"k%04d" % i
                if req.after is None or key > req.after:
                    yield clusterkit.MigrationEntry(key, b"v")

        start = trio.current_time()
        assert await a.ck.peers.request("b", "echo", {"x": 1}, timeout=60) == {"x": 1}
        assert trio.current_time() - start >= 30
        with pytest.raises(clusterkit.PeerUnreachable):  # the timeout is virtual too
            await a.ck.peers.request("b", "echo", 2, timeout=5)
        async with a.ck.peers.stream("b", "count", 200) as stream:
            assert [x async for x in stream] == list(range(200))
        got: list[bytes] = []

        async def sink(pt: int, entries: list[clusterkit.MigrationEntry]) -> None:
            got.extend(e.key for e in entries)

        progress = await a.ck.migration.pull(0, "b", sink, batch_keys=100)
        assert progress.complete and progress.keys == 250 and progress.batches == 3
        assert got == sorted(got) and len(got) == 250
        assert b.ck.peers.address.startswith("127.0.0.1:")  # a network address, no socket

        await cluster.kill("b")
        with pytest.raises(clusterkit.PeerUnreachable):
            await a.ck.peers.request(b.ck.node, "echo", 3, timeout=5)
