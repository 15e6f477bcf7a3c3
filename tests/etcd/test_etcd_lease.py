"""Leases against a real etcd server: granted TTL, keepalive, expiry, revoke."""

from __future__ import annotations

import pytest
import trio

import clusterkit
from clusterkit.etcd import EtcdClient, EventType


async def test_ttl_clamping_is_visible(etcd_binary: str) -> None:
    # etcd's default raft timings (election 1 s) make the minimum TTL 2 s; asking for 1
    # is silently raised, and the client reports what was granted.
    async with clusterkit.open_embedded_etcd(binary=etcd_binary, fast_raft=False) as server:
        async with clusterkit.open_etcd_client(server.endpoints) as client:
            lease = await client.lease_grant(1)
            assert lease.ttl == 2
            info = await client.lease_time_to_live(lease.id)
            assert info.granted_ttl == 2 and 0 < info.ttl <= 2


@pytest.mark.slow
async def test_keepalive_keeps_a_lease_alive(client: EtcdClient, prefix: str) -> None:
    lease = await client.lease_grant(1)  # fast raft timings allow 1 s
    await client.put(prefix + "k", "v", lease=lease.id)
    start = trio.current_time()
    last_sent = start
    while trio.current_time() - start < 3.0:  # three TTLs
        ka = await client.lease_keepalive(lease.id)
        assert ka.id == lease.id and ka.ttl == 1 and ka.sent_at >= last_sent
        last_sent = ka.sent_at
        await trio.sleep(0.3)
    assert await client.get(prefix + "k") is not None
    assert (await client.lease_time_to_live(lease.id)).ttl >= 0


async def test_lease_expiry_is_observed_by_a_watcher(client: EtcdClient, prefix: str) -> None:
    lease = await client.lease_grant(1)
    put = await client.put(prefix + "session", "me", lease=lease.id)
    async with client.watch(prefix, prefix=True, start_revision=put.revision + 1) as watch:
        with trio.fail_after(5):  # TTL + the lessor's 500 ms check + slack
            batch = await watch.__anext__()
    assert [(e.type, e.kv.key) for e in batch.events] == [
        (EventType.DELETE, (prefix + "session").encode())
    ]
    with pytest.raises(clusterkit.LeaseNotFound):
        await client.lease_keepalive(lease.id)
    assert (await client.lease_time_to_live(lease.id)).ttl == -1


async def test_revoke_deletes_attached_keys(client: EtcdClient, prefix: str) -> None:
    lease = await client.lease_grant(60)
    await client.put(prefix + "a", "1", lease=lease.id)
    await client.put(prefix + "b", "2", lease=lease.id)
    info = await client.lease_time_to_live(lease.id, keys=True)
    assert sorted(info.keys) == [(prefix + "a").encode(), (prefix + "b").encode()]
    await client.lease_revoke(lease.id)
    assert (await client.range(prefix, prefix=True)).count == 0
    with pytest.raises(clusterkit.LeaseNotFound):
        await client.lease_revoke(lease.id)


async def test_concurrent_keepalives_for_many_leases(client: EtcdClient) -> None:
    leases = [await client.lease_grant(30) for _ in range(20)]
    results = {}

    async def keep(lease_id: int) -> None:
        for _ in range(3):
            results[lease_id] = await client.lease_keepalive(lease_id)

    async with trio.open_nursery() as nursery:
        for lease in leases:
            nursery.start_soon(keep, lease.id)
    assert {lid: ka.ttl for lid, ka in results.items()} == {lease.id: 30 for lease in leases}
    for lease in leases:
        await client.lease_revoke(lease.id)
