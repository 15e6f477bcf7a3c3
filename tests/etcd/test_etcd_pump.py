"""Keepalive pumps: leases kept alive from the lease bridge's loop thread, not the Trio loop.

Real etcd (both versions through the ``etcd`` fixture) except the router unit test and the
memory client's pump, which runs under ``MockClock``.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import trio
import trio.lowlevel
import trio.testing

import clusterkit
from clusterkit._etcd.lease import KeepAlivePump, KeepAliveStalled, _LoopRouter
from clusterkit._testing.memory_etcd import open_memory_etcd
from clusterkit.etcd import EtcdClient, KeepAlive


async def _wait_for(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


@pytest.mark.slow
async def test_pump_keeps_a_lease_alive_while_trio_is_blocked(
    client: EtcdClient, prefix: str
) -> None:
    # Two leases of 2 s, one kept alive by a pump, the other by an ordinary Trio task that
    # calls lease_keepalive every TTL/3, while the Trio thread is blocked in 0.5 s slices.
    # After every slice the blocker reads both local deadlines (sent_at + ttl of the newest
    # acknowledged keepalive), as the membership actor would.
    ttl, interval = 2, 2 / 3
    pumped = await client.lease_grant(ttl)
    ordinary = await client.lease_grant(ttl)
    await client.put(prefix + "pumped", "v", lease=pumped.id)
    ordinary_deadline = trio.current_time() + ttl
    pump_lapses: list[float] = []
    ordinary_lapses: list[float] = []

    ordinary_expired = False

    async def ordinary_keepalives() -> None:
        nonlocal ordinary_deadline, ordinary_expired
        while True:
            try:
                ka = await client.lease_keepalive(ordinary.id)
            except clusterkit.LeaseNotFound:
                ordinary_expired = True  # etcd itself expired it
                return
            ordinary_deadline = max(ordinary_deadline, ka.sent_at + ka.ttl)
            await trio.sleep(interval)

    async with client.keepalive_pump(pumped.id, interval, stall_limit=3 * ttl) as pump:
        with trio.fail_after(5):
            first = await pump.wait_newer(None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ordinary_keepalives)
            end = trio.current_time() + 6.0
            while trio.current_time() < end:
                # The Trio thread is blocked (on purpose): no task, no callback runs.
                time.sleep(0.5)  # noqa: ASYNC251
                now = trio.current_time()
                pump.checkin()
                latest = pump.latest()
                assert latest is not None
                if now > latest.sent_at + latest.ttl:
                    pump_lapses.append(now - latest.sent_at - latest.ttl)
                if now > ordinary_deadline:
                    ordinary_lapses.append(now - ordinary_deadline)
                await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
        latest = pump.latest()
        assert latest is not None and latest.sent_at > first.sent_at + 4.0
        assert pump.failure is None
    assert pump_lapses == []
    # The ordinary keepalive lost its session: its local deadline passed, or etcd expired it.
    assert ordinary_lapses or ordinary_expired, "the ordinary keepalive kept up"
    assert (await client.lease_time_to_live(pumped.id)).ttl > 0
    assert await client.get(prefix + "pumped") is not None
    await client.lease_revoke(pumped.id)
    if not ordinary_expired:
        await client.lease_revoke(ordinary.id)


async def test_pump_acks_arrive_with_increasing_sent_at(client: EtcdClient) -> None:
    lease = await client.lease_grant(5)
    before = trio.current_time()
    seen: list[KeepAlive] = []
    async with client.keepalive_pump(lease.id, 0.05, stall_limit=5) as pump:
        previous = None
        with trio.fail_after(10):
            for _ in range(8):
                previous = await pump.wait_newer(previous)
                assert previous.sent_at <= trio.current_time()
                seen.append(previous)
        assert pump.acks >= 8 and pump.sends >= pump.acks
    assert all(ka.id == lease.id and ka.ttl == 5 for ka in seen)
    assert [ka.sent_at for ka in seen] == sorted({ka.sent_at for ka in seen})
    assert seen[0].sent_at >= before
    assert isinstance(pump.failure, clusterkit.EtcdUnavailable)  # stopped by the exit
    await client.lease_revoke(lease.id)


async def test_interleaved_ordinary_keepalives_get_their_own_answers(
    client: EtcdClient,
) -> None:
    lease = await client.lease_grant(30)
    results: list[tuple[float, KeepAlive, float]] = []

    async def ordinary() -> None:
        for _ in range(40):
            before = trio.current_time()
            ka = await client.lease_keepalive(lease.id, timeout=5)
            results.append((before, ka, trio.current_time()))
            await trio.sleep(0.003)

    async with client.keepalive_pump(lease.id, 0.005, stall_limit=30) as pump:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(ordinary)
        previous = pump.latest()
        with trio.fail_after(5):
            await pump.wait_newer(previous)
        sends, acks = pump.sends, pump.acks
    assert len(results) == 120
    assert all(before <= ka.sent_at <= after and ka.ttl == 30 for before, ka, after in results)
    assert acks > 20 and sends - acks <= 2  # every pump answer came back to the pump
    assert client.statistics()["keepalive_pending"] == 0
    # The loop saw every ordinary request, and Trio got exactly their answers, no pump's.
    stream = client._keepalives._stream
    assert stream is not None and isinstance(stream.loop_tap, _LoopRouter)
    assert stream.loop_tap.ordinary_sent == 120
    assert stream._consumed == 120
    await client.lease_revoke(lease.id)


def test_the_loop_router_keeps_pump_and_ordinary_answers_apart() -> None:
    pump = KeepAlivePump(7, 1.0, 10.0, clock=lambda: 0.0, offset=100.0, notify_soon=lambda f: None)
    router = _LoopRouter()
    router.sent(SimpleNamespace(ID=7))  # ordinary
    router.pump_sent(pump, 1.0)
    router.sent(SimpleNamespace(ID=8))  # another lease, ordinary
    router.sent(SimpleNamespace(ID=7))  # ordinary
    router.pump_sent(pump, 2.0)
    answers = [(7, 5), (8, 5), (7, 6), (7, 5), (7, 9), (7, 4)]
    routed = [router.received(SimpleNamespace(ID=i, TTL=t)) for i, t in answers]
    # ID 7: ordinary, pump(1.0), ordinary, pump(2.0), then nothing queued; ID 8: ordinary.
    assert routed == [False, False, True, False, True, False]
    assert pump.latest() == KeepAlive(7, 9, 102.0) and pump.acks == 2
    assert router.fifo == {}


async def test_a_revoked_lease_ends_the_pump(client: EtcdClient) -> None:
    lease = await client.lease_grant(30)
    async with client.keepalive_pump(lease.id, 0.05, stall_limit=30) as pump:
        with trio.fail_after(5):
            ka = await pump.wait_newer(None)
        await client.lease_revoke(lease.id)
        with trio.fail_after(5), pytest.raises(clusterkit.LeaseNotFound):
            while True:
                ka = await pump.wait_newer(ka)
        assert isinstance(pump.failure, clusterkit.LeaseNotFound)
        sends = pump.sends
        await trio.sleep(0.3)  # six intervals: no keepalive may be sent after the end
        assert pump.sends == sends


async def test_the_stall_guard_stops_a_pump_that_nobody_reads(client: EtcdClient) -> None:
    lease = await client.lease_grant(1)
    async with client.keepalive_pump(lease.id, 0.1, stall_limit=0.5) as pump:
        start = trio.current_time()
        await _wait_for(lambda: pump.failure is not None)
        assert trio.current_time() - start >= 0.5
        assert isinstance(pump.failure, KeepAliveStalled)
        assert isinstance(pump.failure, clusterkit.ClusterKitError)
        sends = pump.sends
        assert sends >= 3
        # Nobody keeps it alive now: etcd expires it (TTL + the lessor's 500 ms check).
        await _wait_until_expired(client, lease.id)
        assert pump.sends == sends
        with pytest.raises(KeepAliveStalled):
            await pump.wait_newer(None)


async def _wait_until_expired(client: EtcdClient, lease_id: int) -> None:
    with trio.fail_after(10):
        while (await client.lease_time_to_live(lease_id)).ttl != -1:
            await trio.sleep(0.1)


async def test_closing_the_client_stops_the_pump(
    etcd: clusterkit.EmbeddedEtcd, client: EtcdClient
) -> None:
    lease = await client.lease_grant(1)
    async with trio.open_nursery() as nursery:
        own = EtcdClient(clusterkit.EtcdConfig(endpoints=tuple(etcd.endpoints)), nursery)
        own.open_streams()
        async with own.keepalive_pump(lease.id, 0.1, stall_limit=30) as pump:
            with trio.fail_after(5):
                await pump.wait_newer(None)
            thread = own.lease_bridge._thread
            assert thread is not None and thread.is_alive()
            await own.aclose()
            assert not thread.is_alive()
            assert isinstance(pump.failure, clusterkit.EtcdUnavailable)
            with pytest.raises(clusterkit.EtcdUnavailable):
                await pump.wait_newer(pump.latest())
            sends = pump.sends
            await _wait_until_expired(client, lease.id)  # nothing keeps it alive any more
            assert pump.sends == sends
    assert thread not in threading.enumerate()


async def test_a_broken_stream_is_reported_and_the_pump_goes_on(etcd_binary: str) -> None:
    async with clusterkit.open_embedded_etcd(binary=etcd_binary) as server:
        async with clusterkit.open_etcd_client(server.endpoints) as client:
            lease = await client.lease_grant(30)
            async with client.keepalive_pump(lease.id, 0.1, stall_limit=60) as pump:
                with trio.fail_after(5):
                    ka = await pump.wait_newer(None)
                await server.member.kill()
                with trio.fail_after(10), pytest.raises(clusterkit.EtcdUnavailable):
                    while True:
                        ka = await pump.wait_newer(ka)
                assert pump.breaks >= 1 and pump.failure is None
                await server.member.restart()
                with trio.fail_after(20):
                    while True:
                        try:
                            newer = await pump.wait_newer(ka)
                            break
                        except clusterkit.EtcdUnavailable:
                            continue  # more breaks while etcd comes back
                assert newer.sent_at > ka.sent_at and newer.ttl > 0
            await client.lease_revoke(lease.id)


async def test_the_real_pump_refuses_a_virtual_clock(etcd: clusterkit.EmbeddedEtcd) -> None:
    def run_under_mock_clock() -> None:
        async def main() -> None:
            async with clusterkit.open_etcd_client(etcd.endpoints) as client:
                lease = await client.lease_grant(5)
                with pytest.raises(clusterkit.ConfigError):
                    async with client.keepalive_pump(lease.id, 1.0, stall_limit=10):
                        pass
                await client.lease_revoke(lease.id)

        trio.run(main, clock=trio.testing.MockClock())

    await trio.to_thread.run_sync(run_under_mock_clock)


def test_the_memory_clients_pump_works_under_mock_clock() -> None:
    async def main() -> None:
        async with open_memory_etcd() as store:
            client = store.client()
            lease = await client.lease_grant(3)
            async with client.keepalive_pump(lease.id, 1.0, stall_limit=9) as pump:
                previous = None
                for _ in range(5):
                    previous = await pump.wait_newer(previous)
                assert previous is not None and previous.sent_at == 4.0 and previous.ttl == 3
                assert pump.acks == 5
                await trio.sleep(30)  # read nothing: the stall guard ends it
                assert isinstance(pump.failure, KeepAliveStalled)
                await trio.sleep(5)
                assert (await client.lease_time_to_live(lease.id)).ttl == -1
            lease = await client.lease_grant(3)
            async with client.keepalive_pump(lease.id, 1.0, stall_limit=9) as pump:
                ka = await pump.wait_newer(None)
                await client.lease_revoke(lease.id)
                with pytest.raises(clusterkit.LeaseNotFound):
                    await pump.wait_newer(ka)
            async with client.keepalive_pump(lease.id, 1.0, stall_limit=9) as pump:
                await client.aclose()
                with pytest.raises(clusterkit.EtcdUnavailable):
                    await pump.wait_newer(None)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_pump_with_auth_goes_on_after_a_restart(etcd_binary: str) -> None:
    # A restart breaks the stream and forgets etcd's simple tokens; the pump goes on over a
    # new stream (etcd does not check tokens on LeaseKeepAlive; KV calls re-authenticate).
    async with clusterkit.open_embedded_etcd(binary=etcd_binary) as server:
        async with clusterkit.open_etcd_client(server.endpoints) as admin:
            await admin.user_add("root", "rootpw")
            await admin.role_add("root")
            await admin.user_grant_role("root", "root")
            await admin.user_add("alice", "alicepw")
            await admin.role_add("alice-rw")
            await admin.role_grant_prefix("alice-rw", "/alice/")
            await admin.user_grant_role("alice", "alice-rw")
            await admin.auth_enable()
        cfg = clusterkit.EtcdConfig(server.endpoints, username="alice", password="alicepw")
        async with clusterkit.open_etcd_client(cfg) as alice:
            lease = await alice.lease_grant(30)
            await alice.put("/alice/session", "me", lease=lease.id)
            async with alice.keepalive_pump(lease.id, 0.1, stall_limit=60) as pump:
                with trio.fail_after(5):
                    ka = await pump.wait_newer(None)
                await server.member.restart()
                with trio.fail_after(20):
                    while True:
                        try:
                            ka2 = await pump.wait_newer(ka)
                        except clusterkit.EtcdUnavailable:
                            continue
                        if pump.breaks:
                            break
                        ka = ka2
                assert ka2.sent_at > ka.sent_at and ka2.ttl == 30 and pump.failure is None
            assert (await alice.get("/alice/session")) is not None
            assert alice.reauthentications >= 1
