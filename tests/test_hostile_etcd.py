"""State under the prefix that clusterkit did not write: leader keys (virtual time).

An operator's ``etcdctl put``/``del`` on a leader key must never leave a partition without an
accepting leader, nor leave a node believing it leads without holding its key.
"""

from __future__ import annotations

import trio
import trio.testing

from clusterkit._core.keys import KeyLayout
from clusterkit.testing import TestCluster, open_test_cluster

P = 8
LAYOUT = KeyLayout("/clusterkit")


def leaders_of(cluster: TestCluster, pt: int) -> list[str]:
    return [n.node_id for n in cluster.nodes.values() if n.ck.is_leader(pt)]


async def _one_leader_with_a_lease(cluster: TestCluster, pt: int, above: int) -> str:
    client = cluster.store.client()
    try:
        while True:
            kv = await client.get(LAYOUT.leader(pt))
            holders = leaders_of(cluster, pt)
            if kv is not None and kv.lease and kv.create_revision > above and len(holders) == 1:
                assert holders == [kv.value.decode()]
                return holders[0]
            await trio.sleep(0.01)
    finally:
        await client.aclose()


async def test_a_leader_key_overwritten_without_a_lease_is_replaced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(partitions=P, replica_factor=3, session_ttl=2.0) as cluster:
        for name in ("a", "b", "c"):
            await cluster.start(name)
        await cluster.wait_converged()
        with trio.fail_after(30):
            holder = await _one_leader_with_a_lease(cluster, 5, 0)
        epoch = cluster.nodes[holder].ck.leader_epoch(5)
        assert epoch is not None
        client = cluster.store.client()
        await client.put(LAYOUT.leader(5), holder)  # same value, no lease: never expires
        await client.aclose()
        with trio.fail_after(1):  # the holder stops leading as soon as its view shows it
            while cluster.nodes[holder].ck.is_leader(5):
                await trio.sleep(0.001)
        with trio.fail_after(2.0 + 0.5):  # within session_ttl + rebalance_delay
            await _one_leader_with_a_lease(cluster, 5, epoch)
        stats = cluster.nodes[holder].ck.statistics()
        assert stats["WatcherActor"]["garbage"] >= 1


async def test_a_lease_less_leader_key_of_a_leaderless_partition_is_removed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_cluster(partitions=P, replica_factor=3, session_ttl=2.0) as cluster:
        client = cluster.store.client()
        await client.put(LAYOUT.leader(2), "ghost")  # there before any node
        await client.aclose()
        for name in ("a", "b", "c"):
            await cluster.start(name)
        await cluster.wait_converged()
        with trio.fail_after(5):
            await _one_leader_with_a_lease(cluster, 2, 0)
        removed = sum(
            n.ck.statistics()["PartitionSupervisor"]["foreign_leader_keys_removed"]
            for n in cluster.nodes.values()
        )
        assert removed >= 1
