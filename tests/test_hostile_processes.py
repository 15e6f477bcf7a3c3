"""Hostile etcd state on a real etcd, under the KV store's writes, every node in its own process.

The rows of issue 11's table, one after another, while writers overwrite keys through the
routing client: garbage in, deletion of and a foreign well-formed ``P/map``; deletion of and
garbage in a node's key; a lease-less leader key; a lease-less ghost node; deletion and
overwrite of the secret (then a new node joins and must authenticate); 2,000 junk keys.

Required, per row: every partition has a leader among the live nodes again within
``session_ttl + rebalance_delay`` (plus scheduling slack on this shared machine), and no
write (each round of the writers covers every partition) waits longer than that; no node
process exits; the maps clusterkit writes never go down in version. At the end every
acknowledged write is read back (0 lost).
"""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
import trio

import clusterkit
from clusterkit._core.keys import KeyLayout
from clusterkit._core.records import (
    MapRecord,
    Node,
    RecordError,
    decode_map,
    encode_map,
    encode_node,
)
from clusterkit.etcd import Op
from examples.kv_store.demo import NodeProcess, Report, Writer, healthy, verify

PREFIX = "/hostile"
LAYOUT = KeyLayout(PREFIX)
P = 16
SESSION_TTL = 2.0
REBALANCE_DELAY = 1.0
RECOVERY = SESSION_TTL + REBALANCE_DELAY + 7.0  # + slack: 3 processes, etcd, test share 2 cores
KEYS = [f"key-{i:04d}" for i in range(400)]


async def _act(op: clusterkit.EtcdClient, act: str) -> None:
    """Do ``act``."""
    match act:
        case "map_garbage":
            await op.put(LAYOUT.map, b"not json")
        case "map_delete":
            await op.delete(LAYOUT.map)
        case "map_foreign":  # well-formed, of another shape (P // 2), version 1
            record = MapRecord(1, P // 2, 1, tuple(("n1",) for _ in range(P // 2)))
            await op.put(LAYOUT.map, encode_map(record))
        case "node_delete":
            await op.delete(LAYOUT.node("n2"))
        case "node_garbage":
            await op.put(LAYOUT.node("n3"), b"\x00garbage")
        case "leader_leaseless":
            await op.put(LAYOUT.leader(5), b"n1")
        case "ghost":
            await op.put(LAYOUT.node("ghost"), encode_node(Node("ghost", "127.0.0.1:1")))
        case "secret_delete":
            await op.delete(LAYOUT.secret)
        case "secret_overwrite":
            await op.put(LAYOUT.secret, b"f" * 64)
        case "junk":
            for start in range(0, 2000, 100):
                await op.txn(
                    [],
                    [Op.put(LAYOUT.root + b"junk/%d" % i, b"x") for i in range(start, start + 100)],
                )


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


@pytest.mark.slow
async def test_hostile_state_on_real_etcd_loses_nothing_and_stops_no_process() -> None:
    with trio.fail_after(240):
        await _run()


async def _run() -> None:
    report = Report(keys=len(KEYS))
    problems: list[str] = []
    recovery: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="clusterkit-hostile-") as data_dir:
        async with clusterkit.open_embedded_etcd(data_dir=data_dir) as etcd:
            common = ["--etcd", ",".join(etcd.endpoints), "--prefix", PREFIX]
            common += ["--partitions", str(P), "--replicas", "3"]
            common += ["--session-ttl", str(SESSION_TTL), "--rebalance-delay", str(REBALANCE_DELAY)]
            nodes = {n: NodeProcess(n, common) for n in ("n1", "n2", "n3", "n4")}
            async with (
                clusterkit.open_etcd_client(etcd.endpoints) as op,
                trio.open_nursery() as nursery,
            ):
                try:
                    for name in ("n1", "n2", "n3"):
                        await nursery.start(nodes[name].run)
                    config = clusterkit.ClientConfig(
                        etcd_endpoints=list(etcd.endpoints), etcd_prefix=PREFIX
                    )
                    async with clusterkit.open_client(config) as client:
                        live = {"n1", "n2", "n3"}
                        with trio.fail_after(60):
                            while not healthy(client, live):
                                await trio.sleep(0.05)
                        writer = Writer(client, report)

                        async def map_versions(task_status: Any) -> None:
                            highest = 0
                            async with op.watch(LAYOUT.map) as watch:
                                task_status.started()
                                async for batch in watch:
                                    for event in batch.events:
                                        if not event.kv.value:
                                            continue  # deleted (by us)
                                        try:
                                            record = decode_map(event.kv.value)
                                        except RecordError:
                                            continue  # ours (garbage)
                                        if record.partitions != P:
                                            # Ours, the foreign map (by its shape: the watch
                                            # may deliver it before our put returns).
                                            continue
                                        version = record.version
                                        if version < highest:
                                            problems.append(f"map version {highest} -> {version}")
                                        highest = max(highest, version)

                        async def overwrite(stop: trio.Event, done: trio.Event) -> None:
                            version = 1
                            while not stop.is_set():
                                items: list[tuple[str, bytes | None]] = [
                                    (k, f"v{version}-{k}".encode()) for k in KEYS
                                ]
                                await writer.write_all(items, 16)
                                version += 1
                            done.set()

                        stop, written = trio.Event(), trio.Event()
                        async with trio.open_nursery() as load:
                            await load.start(map_versions)
                            load.start_soon(overwrite, stop, written)
                            for act in ACTS:
                                await trio.sleep(1.0)
                                await _act(op, act)
                                start = trio.current_time()
                                if act == "secret_overwrite":  # then a node joins and gets in
                                    await nursery.start(nodes["n4"].run)
                                    live = live | {"n4"}
                                await trio.sleep(0.2)
                                with trio.move_on_after(
                                    RECOVERY + 30 * (act == "secret_overwrite")
                                ):
                                    while not healthy(client, live):
                                        await trio.sleep(0.05)
                                recovery[act] = trio.current_time() - start
                                if not healthy(client, live):
                                    problems.append(
                                        f"{act}: not healthy after {recovery[act]:.1f} s"
                                    )
                                for name, node in nodes.items():
                                    if node.exited.is_set() and name in live:
                                        problems.append(f"{act}: {name} exited")
                            await op.delete(LAYOUT.root + b"junk/", prefix=True)
                            await op.delete(LAYOUT.node("ghost"))
                            stop.set()
                            await written.wait()
                            load.cancel_scope.cancel()  # the map watch
                        await verify(client, writer, KEYS, report, 16)
                finally:
                    with trio.CancelScope(shield=True):
                        for node in nodes.values():
                            await node.stop()
                    nursery.cancel_scope.cancel()
    print({act: round(t, 2) for act, t in recovery.items()})
    print(
        f"writes acknowledged {report.writes_acknowledged}, unacknowledged "
        f"{report.writes_unacknowledged}, slowest {report.max_write_seconds:.2f} s, "
        f"retries {report.retries}, lost {report.lost}"
    )
    assert problems == []
    # Liveness: every write (each round covers every partition) was acknowledged, none took
    # longer than a session's expiry plus a rebalance (with slack): no partition stalled.
    assert report.writes_unacknowledged == 0
    assert report.max_write_seconds < RECOVERY
    assert report.lost == 0, report.lost_examples
    assert report.verified == len(KEYS)
