"""The end-to-end proof: the example KV store loses no acknowledged write.

Runs ``examples/kv_store/demo.py`` with smaller numbers: three node processes on an embedded
etcd, writes through the routing client, SIGKILL of the busiest leader mid-write, a fourth
node joining, another node draining and the new one frozen (SIGSTOP) beyond its TTL while keys
are overwritten and deleted, then every key read back from the leaders.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from cluster_helpers import RunningNode, node_config, start_node, wait_converged
from tcp_proxy import open_proxy

import clusterkit
from clusterkit.testing import TestCluster, open_test_cluster
from examples.kv_store.demo import run
from examples.kv_store.node import KVNode


@pytest.mark.slow
async def test_no_acknowledged_write_is_lost_through_kill_join_and_drain() -> None:
    with trio.fail_after(240):
        report = await run(keys=1500, partitions=16, concurrency=24, echo=False)
    print("\n".join(report.lines()))
    assert report.lost == 0, report.lost_examples
    assert report.killed and report.drained == sorted({"n1", "n2", "n3"} - {report.killed})[0]
    assert report.paused == "n4"
    assert report.verified == report.keys  # every key had an acknowledged write
    assert report.writes_acknowledged + report.writes_unacknowledged == report.writes_attempted
    assert report.writes_acknowledged >= report.keys
    # the survivors and the new node hold the data; the drained and killed nodes are gone
    assert set(report.holdings) == {"n1", "n2", "n3", "n4"} - {report.killed, report.drained}
    assert all(h["keys"] > 0 for h in report.holdings.values())


async def _until(condition: Callable[[], bool], timeout: float) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)  # polled: is_leader is a clock comparison, not an event


@pytest.mark.slow
async def test_a_replica_that_rejoins_resyncs_before_it_leads_again(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    """Node a is cut off from etcd beyond its TTL and rejoins within the rebalance delay, so
    the map never changes. Meanwhile c leads and acknowledges a write. a must pull it (a
    re-sync: on_partition_assigned again) before it takes its preferred partition back."""
    async with open_proxy(etcd.endpoints[0]) as proxy, trio.open_nursery() as nursery:
        kv: dict[str, KVNode] = {}
        running: dict[str, RunningNode] = {}
        for nid in ("a", "b", "c"):
            node = kv[nid] = KVNode(nid)
            cfg = node_config(
                nid,
                [proxy.endpoint] if nid == "a" else etcd.endpoints,
                prefix,
                partitions=4,
                session_ttl=1.0,
                rebalance_delay=5.0,
                on_partition_assigned=node.on_partition_assigned,
                on_partition_unassigned=node.on_partition_unassigned,
            )
            running[nid] = await start_node(nursery, cfg)
            node.attach(running[nid].ck)
        await wait_converged(list(running.values()))
        a, b = running["a"].ck, running["b"].ck
        assert a.view.map is not None
        pt = next(p for p in range(4) if a.view.map.replicas[p][0] == "a")
        key = next(f"k{i}" for i in range(10_000) if a.get_partition(f"k{i}") == pt)
        await _until(lambda: a.is_leader(pt), 10)
        await kv["a"].put({"k": key, "v": b"v1"})
        version = a.view.map.version

        proxy.freeze()  # a is cut off from etcd (only) for longer than its TTL
        await _until(lambda: "a" not in b.view.nodes, 15)
        await _until(lambda: any(running[n].ck.is_leader(pt) for n in ("b", "c")), 15)
        leader = next(n for n in ("b", "c") if running[n].ck.is_leader(pt))
        await kv[leader].put({"k": key, "v": b"v2"})  # acknowledged: b and c have it

        proxy.thaw()
        await _until(lambda: a.is_leader(pt), 20)  # the preferred replica leads again
        assert b.view.map is not None and b.view.map.version == version  # no map change
        answer = await kv["a"].get({"k": key})
        assert answer == {"found": True, "v": b"v2", "epoch": answer["epoch"], "seq": 1}
        assert a.statistics()["PartitionSupervisor"]["resyncs"] >= 1
        nursery.cancel_scope.cancel()


class VirtualStore:
    """KV nodes on a clusterkit.testing cluster, and writes through their leaders."""

    def __init__(self, cluster: TestCluster) -> None:
        self.cluster = cluster
        self.kv: dict[str, KVNode] = {}
        self.acked: dict[str, bytes] = {}

    async def start(self, node_id: str) -> None:
        node = self.kv[node_id] = KVNode(node_id)
        await self.cluster.start(
            node_id,
            setup=node.attach,
            on_partition_assigned=node.on_partition_assigned,
            on_partition_unassigned=node.on_partition_unassigned,
        )

    def leader(self, key: str) -> KVNode | None:
        live = [self.kv[n] for n in self.cluster.nodes]
        return next((n for n in live if n.ck.is_leader(n.ck.get_partition(key))), None)

    async def write(self, key: str, value: bytes) -> None:
        """Retry through whoever leads until acknowledged (or 60 virtual seconds pass)."""
        with trio.move_on_after(60):
            while True:
                node = self.leader(key)
                if node is not None:
                    try:
                        await node.put({"k": key, "v": value})
                        self.acked[key] = value
                        return
                    except clusterkit.ClusterKitError:
                        pass
                await trio.sleep(0.05)

    async def lost(self, partitions: int) -> list[tuple[str, Any, bytes]]:
        """Once the cluster settled: acknowledged values the leaders do not serve."""
        with trio.fail_after(120):
            await self.cluster.wait_converged()
            for n in self.cluster.nodes.values():
                await n.ck._views.wait_for(lambda v: len(v.leaders) == partitions)
        missing: list[tuple[str, Any, bytes]] = []
        for key, value in self.acked.items():
            with trio.fail_after(30):
                while (leader := self.leader(key)) is None:
                    await trio.sleep(0.1)
            answer = await leader.get({"k": key})
            if answer.get("v") != value:
                missing.append((key, answer.get("v"), value))
        return missing


async def test_the_kv_store_loses_nothing_in_a_virtual_time_cluster(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same store on clusterkit.testing (in-memory etcd and network, virtual time): writes
    through the leaders while the busiest leader is killed, a node joins and another drains.
    Deterministic, and it runs in well under a second of real time."""
    async with open_test_cluster(
        partitions=16, replica_factor=3, session_ttl=2.0, rebalance_delay=1.0
    ) as cluster:
        store = VirtualStore(cluster)
        for node_id in ("n1", "n2", "n3"):
            await store.start(node_id)
        await cluster.wait_converged()

        async def write_all(version: int) -> None:
            async with trio.open_nursery() as writers:
                for w in range(8):

                    async def worker(w: int = w) -> None:
                        for i in range(w, 400, 8):
                            await store.write(f"key-{i:04d}", b"v%d-%d" % (version, i))

                    writers.start_soon(worker)

        async with trio.open_nursery() as phase:
            phase.start_soon(write_all, 1)
            await trio.sleep(0.5)
            led = {
                n.node_id: sum(n.ck.is_leader(pt) for pt in range(16))
                for n in cluster.nodes.values()
            }
            await cluster.kill(max(led, key=lambda n: led[n]))
        await store.start("n4")
        async with trio.open_nursery() as phase:
            phase.start_soon(write_all, 2)
            drained = sorted(n for n in cluster.nodes if n != "n4")[0]
            await cluster.stop(drained, drain=True)
        assert len(store.acked) == 400 and await store.lost(16) == []
        assert max(led.values()) > 0  # the killed node was leading
        assert sum(node.stats["keys_pulled"] for node in store.kv.values()) > 0  # data moved


SEEDS = range(8)


async def _random_faults(seed: int) -> tuple[int, list[tuple[str, Any, bytes]]]:
    """100 keys written once, then writers overwrite 200 more while a seeded sequence of
    kills, joins, drains and etcd cut-offs runs; every acknowledged value must be what its
    leader serves at the end (the cold keys have moved by migration alone)."""
    rng = random.Random(seed)
    async with open_test_cluster(
        partitions=8, replica_factor=3, session_ttl=2.0, rebalance_delay=1.0
    ) as cluster:
        store = VirtualStore(cluster)
        names = (f"n{i}" for i in range(1, 100))
        cut: set[str] = set()

        async def writer(w: int, stop: trio.Event) -> None:
            version = 0
            while not stop.is_set():
                version += 1
                for i in range(w, 200, 6):
                    await store.write(f"k{i:03d}", b"%d-%d" % (version, i))
                    await trio.sleep(0.01)  # virtual time moves only while every task waits

        for _ in range(3):
            await store.start(next(names))
        await cluster.wait_converged()
        for i in range(100):  # cold keys: written once, they must survive by migration alone
            await store.write(f"c{i:03d}", b"cold-%d" % i)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for w in range(6):
                nursery.start_soon(writer, w, stop)
            for _ in range(6):
                await trio.sleep(rng.uniform(0.5, 4))
                live = sorted(n for n in cluster.nodes if n not in cut)
                op = rng.choice(["kill", "join", "drain", "cut", "restore"])
                if op == "kill" and len(live) > 2:
                    await cluster.kill(rng.choice(live))
                elif op == "join":
                    await store.start(next(names))
                elif op == "drain" and len(live) > 2:
                    with trio.move_on_after(30):
                        await cluster.stop(rng.choice(live), drain=True)
                elif op == "cut" and len(live) > 2:
                    victim = rng.choice(live)
                    cluster.nodes[victim].cut()
                    cut.add(victim)
                elif op == "restore" and cut:
                    back = cut.pop()
                    if back in cluster.nodes:
                        cluster.nodes[back].restore()
            for back in cut:
                if back in cluster.nodes:
                    cluster.nodes[back].restore()
            await trio.sleep(5)
            stop.set()
        return len(store.acked), await store.lost(8)


@pytest.mark.slow
async def test_randomized_faults_lose_no_acknowledged_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for seed in SEEDS:
        written, lost = await _random_faults(seed)
        assert written == 300 and lost == [], (seed, lost[:3])
