"""The Trio <-> grpc.aio bridge (batched wakeups, the urgent lane, shutdown), and which calls
of the etcd client run where: lease calls on the bridge, the rest in the Trio thread."""

from __future__ import annotations

import functools
import threading
from typing import Any

import pytest
import trio

import clusterkit
from clusterkit._etcd.bridge import AioBridge
from clusterkit._etcd.channel import Endpoint
from clusterkit._etcd.pb.etcdserverpb import rpc_pb2
from clusterkit._etcd.stream import BidiStream
from clusterkit._etcd.types import prefix_end


async def test_a_burst_of_completions_wakes_trio_once() -> None:
    bridge = AioBridge("test")
    got: list[int] = []
    try:
        before = bridge.statistics()["bridge_wakeups"]

        def burst() -> None:  # on the loop: 100 completions in one go
            for i in range(100):
                bridge.post(functools.partial(got.append, i))

        bridge.submit(burst)
        with trio.fail_after(5):
            while len(got) < 100:
                await trio.sleep(0.01)
        assert got == list(range(100))
        assert bridge.statistics()["bridge_wakeups"] - before == 1
    finally:
        await bridge.aclose()


async def test_the_urgent_lane_runs_first() -> None:
    bridge = AioBridge("test")
    release = threading.Event()
    order: list[str] = []
    try:
        # Hold the loop inside a drain, queue bulk work then urgent work behind it.
        bridge.submit(lambda: release.wait(5))
        with trio.fail_after(5):
            while bridge._in_armed:  # the loop has taken the blocking call
                await trio.sleep(0.001)
        for i in range(3):
            bridge.submit(functools.partial(order.append, f"bulk{i}"))
        bridge.submit(lambda: order.append("urgent"), urgent=True)
        release.set()
        with trio.fail_after(5):
            while len(order) < 4:
                await trio.sleep(0.01)
        assert order == ["urgent", "bulk0", "bulk1", "bulk2"]
    finally:
        release.set()
        await bridge.aclose()


async def test_a_closed_bridge_refuses_calls_and_its_thread_is_gone() -> None:
    bridge = AioBridge("test-closed")
    seen = trio.Event()
    bridge.submit(lambda: bridge.post(seen.set))
    with trio.fail_after(5):
        await seen.wait()
    assert any(t.name == "clusterkit-test-closed-aio" for t in threading.enumerate())
    await bridge.aclose()
    assert not any(t.name == "clusterkit-test-closed-aio" for t in threading.enumerate())
    endpoint = Endpoint("127.0.0.1:1", clusterkit.EtcdConfig(("127.0.0.1:1",)))
    with pytest.raises(clusterkit.EtcdUnavailable):
        await bridge.unary(endpoint, "kv", "Range", None, timeout=1)


async def test_calls_cancelled_in_the_tick_they_start_leave_nothing_behind(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with clusterkit.open_etcd_client(etcd.endpoints) as client:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(client.put, f"{prefix}{i}", "v")
            await trio.lowlevel.checkpoint()  # every task is now parked on the bridge
            nursery.cancel_scope.cancel()
        with trio.fail_after(5):
            while client.statistics()["rpc_in_flight"]:
                await trio.sleep(0.01)
        stats = client.statistics()
        assert stats["rpc_cancelled"] <= stats["rpc_started"]
        assert (await client.get(f"{prefix}x")) is None  # still works


async def test_many_concurrent_calls_all_complete(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with clusterkit.open_etcd_client(etcd.endpoints) as client:
        await client.put(prefix + "k", "v")
        before = client.statistics()
        results: list[bytes] = []

        async def get() -> None:
            kv = await client.get(prefix + "k")
            assert kv is not None
            results.append(kv.value)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(get)
        after = client.statistics()
        assert results == [b"v"] * 200
        assert after["rpc_started"] - before["rpc_started"] == 200
        assert after["rpc_in_flight"] == 0


async def test_a_stream_stops_reading_when_its_credits_are_spent(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    """Flow control: with 2 credits the reader stops after 2 unreleased responses (etcd then
    holds the rest), and goes on once they are released."""
    async with clusterkit.open_etcd_client(etcd.endpoints) as client:
        for i in range(5):
            await client.put(f"{prefix}{i}", "v")
        got: list[Any] = []
        ended: list[BaseException | None] = []
        stream = BidiStream(
            client.lease_bridge,
            client.endpoints.current,
            "watch",
            "Watch",
            metadata=(),
            on_response=got.append,
            on_error=ended.append,
            credits=2,
        )
        try:
            key = prefix.encode()
            for i in range(4):  # four watches from revision 1: four answers, then events
                create = rpc_pb2.WatchCreateRequest(
                    key=key, range_end=prefix_end(key), start_revision=1, watch_id=i + 1
                )
                stream.send(rpc_pb2.WatchRequest(create_request=create))
            with trio.fail_after(5):
                while not (stream._starved and len(got) == 2):
                    await trio.sleep(0.01)
            assert len(got) == 2 and not ended
            stream.release(2)
            with trio.fail_after(5):
                while len(got) < 4:
                    await trio.sleep(0.01)
            assert not ended
        finally:
            await stream.aclose()
        assert ended == [None]  # closed by us


async def test_lease_calls_run_on_the_lease_bridge(etcd: clusterkit.EmbeddedEtcd) -> None:
    async with clusterkit.open_etcd_client(etcd.endpoints) as client:
        before = client.statistics()
        lease = await client.lease_grant(10)
        await client.lease_keepalive(lease.id)
        await client.lease_time_to_live(lease.id)
        await client.lease_revoke(lease.id)
        after = client.statistics()
        assert after["lease_rpc_started"] - before["lease_rpc_started"] == 3
        assert after["rpc_started"] == before["rpc_started"]
        assert after["lease_bridge_wakeups"] > before["lease_bridge_wakeups"]
        names = {t.name for t in threading.enumerate()}
        assert "clusterkit-etcd-lease-aio" in names
        assert "clusterkit-etcd-aio" not in names  # (the bridge the other calls used to run on)


async def test_unary_calls_and_watches_start_no_thread(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with clusterkit.open_etcd_client(etcd.endpoints) as client:
        await client.get(prefix + "warm")
        before = {t.ident for t in threading.enumerate()}
        async with client.watch(prefix, prefix=True) as watch:
            for i in range(20):
                await client.put(f"{prefix}{i}", "v")
                assert await client.get(f"{prefix}{i}") is not None
            seen = 0
            with trio.fail_after(5):
                async for batch in watch:
                    seen += len(batch.events)
                    if seen == 20:
                        break
        assert {t.ident for t in threading.enumerate()} == before


async def test_a_lease_revoked_on_the_bridge_reaches_a_watch_in_trio(
    etcd: clusterkit.EmbeddedEtcd,
) -> None:
    async with clusterkit.open_etcd_client(etcd.endpoints) as client:
        lease = await client.lease_grant(10)
        await client.put("bridge/poller", "v", lease=lease.id)
        await client.lease_keepalive(lease.id)
        with trio.fail_after(5):
            async with client.watch("bridge/poller") as watch:
                await client.lease_revoke(lease.id)
                async for batch in watch:
                    if batch.events:
                        seen = [(e.type.value, e.kv.key) for e in batch.events]
                        assert seen == [("delete", b"bridge/poller")]
                        break
        started = trio.current_time()
    assert trio.current_time() - started < 2.0  # closing does not stall


async def test_the_client_nursery_does_not_wrap_errors(etcd: clusterkit.EmbeddedEtcd) -> None:
    """The client's HTTP/2 connections run in a nursery of ``open_etcd_client``: an error of
    the block, or of connecting, still comes out as itself, not in an ExceptionGroup."""
    with pytest.raises(KeyError):
        async with clusterkit.open_etcd_client(etcd.endpoints) as client:
            await client.get("x")
            raise KeyError("mine")
    config = clusterkit.EtcdConfig(("127.0.0.1:1",), dial_timeout=0.3)
    with pytest.raises(clusterkit.EtcdUnavailable):
        async with clusterkit.open_etcd_client(config):
            pass
