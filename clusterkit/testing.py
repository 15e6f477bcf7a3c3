"""Test your clusterkit application without an etcd server, in virtual time.

:func:`open_memory_etcd` starts an in-memory etcd v3 that lives on the Trio clock, and
``store.client()`` gives clients with the same API, results and errors as
:class:`clusterkit.EtcdClient` (a contract suite runs the same tests against both). Under
``trio.testing.MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock`` fixture),
leases, timeouts and sleeps cost no wall-clock time, and a run is deterministic::

    import trio
    from clusterkit.testing import open_memory_etcd

    async def test_my_lock_expires(autojump_clock: trio.testing.MockClock) -> None:
        async with open_memory_etcd() as store:
            client = store.client()
            lease = await client.lease_grant(10)
            await client.put("/app/lock", "me", lease=lease.id)
            ka = await client.lease_keepalive(lease.id)
            async with client.watch("/app/lock") as watch:
                batch = await watch.__anext__()  # the lease expires, the key goes
            assert trio.current_time() == ka.sent_at + 10

Without pytest-trio, pass the clock yourself:
``trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))``.

Faults: ``store.fail(EtcdUnavailable)`` / ``store.heal()`` make every request fail (open
watches end); ``client.cut()`` / ``client.restore()`` cut one client off; leases keep
expiring meanwhile. ``store.compact(revision)`` compacts history. See
:class:`MemoryEtcd` for every knob.

Whole clusters: :func:`open_test_cluster` runs real clusterkit nodes (``open_cluster`` with
all its actors) on one in-memory etcd, with knobs to cut a node off, kill it, or stop it::

    async def test_failover(autojump_clock: trio.testing.MockClock) -> None:
        async with open_test_cluster(partitions=16, session_ttl=5) as cluster:
            a = await cluster.start("a", on_leader_elected=my_hook)
            b = await cluster.start("b")
            await cluster.wait_converged()
            await cluster.kill("a")  # b takes over once a's lease expires

The nodes' peers (``ck.peers``, ``ck.migration``) talk over an in-process network
(``cluster.network``), so hooks that pull data run in virtual time too.
"""

from ._testing.memory_etcd import MemoryEtcd, MemoryEtcdClient, open_memory_etcd
from ._testing.virtual_cluster import TestCluster, TestNode, open_test_cluster

__all__ = [
    "MemoryEtcd",
    "MemoryEtcdClient",
    "TestCluster",
    "TestNode",
    "open_memory_etcd",
    "open_test_cluster",
]
