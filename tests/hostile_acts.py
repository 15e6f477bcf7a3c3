"""What an operator, a tool or an attacker can do to the state under the cluster prefix
(issue 11's table), shared by the virtual-time and the real-etcd hostile suites."""

from __future__ import annotations

from clusterkit._core.keys import KeyLayout
from clusterkit._core.records import MapRecord, Node, encode_map, encode_node
from clusterkit.etcd import EtcdClient, Op

ACTS = (
    "map_garbage",
    "map_delete",
    "map_foreign",
    "node_delete",
    "node_garbage",
    "leader_leaseless",
    "ghost",
    "secret_delete",
    "secret_overwrite",
    "junk",
)


async def hostile_act(
    op: EtcdClient,
    layout: KeyLayout,
    act: str,
    *,
    victim: str,
    partition: int,
    partitions: int,
    ghost_addr: str,
    junk: int,
) -> int:
    """Do ``act`` to ``victim`` (a node id) or ``partition``; returns the revision of a map
    written here (0 if none), which the cluster did not write."""
    match act:
        case "map_garbage":
            await op.put(layout.map, b"not json")
        case "map_delete":
            await op.delete(layout.map)
        case "map_foreign":  # well-formed, for a cluster of another shape, version 1
            replicas = tuple((victim,) for _ in range(partitions // 2))
            record = MapRecord(1, partitions // 2, 1, replicas)
            return (await op.put(layout.map, encode_map(record))).revision
        case "node_delete":
            await op.delete(layout.node(victim))
        case "node_garbage":
            await op.put(layout.node(victim), b"\x00garbage")
        case "leader_leaseless":
            await op.put(layout.leader(partition), victim)
        case "ghost":
            await op.put(layout.node("ghost"), encode_node(Node("ghost", ghost_addr)))
        case "secret_delete":
            await op.delete(layout.secret)
        case "secret_overwrite":
            await op.put(layout.secret, b"f" * 64)
        case "junk":
            for start in range(0, junk, 100):
                keys = range(start, min(start + 100, junk))
                await op.txn([], [Op.put(layout.root + b"junk/%d" % i, b"x") for i in keys])
        case _:
            raise ValueError(f"unknown act {act!r}")
    return 0
