"""The end-to-end proof: the example KV store loses no acknowledged write.

Runs ``examples/kv_store/demo.py`` with smaller numbers: three node processes on an embedded
etcd, writes through the routing client, SIGKILL of the busiest leader mid-write, a fourth
node joining, another node draining and the new one frozen (SIGSTOP) beyond its TTL while keys
are overwritten and deleted, then every key read back from the leaders.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from cluster_helpers import RunningNode, node_config, start_node, wait_converged
from tcp_proxy import open_proxy

import clusterkit
from examples.kv_store.demo import run
from examples.kv_store.node import KVNode


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
