"""Hostile etcd state under the KV store's writes, in virtual time with seeded schedules.

While writers keep overwriting keys through the leaders, an "operator" does what issue 11's
table lists, in a random order per seed: garbage in, deletion of, and a foreign well-formed
``P/map``; deletion of and garbage in a node's key; lease-less leader keys; a lease-less ghost
node; deletion and overwrite of the secret (``P.secret``); junk keys. Required: no node
exits, no node's map version ever goes down, and once the cluster settles every acknowledged
write is served by its leader (0 lost).
"""

from __future__ import annotations

import random
from typing import Any, cast

import pytest
import trio
import trio.testing
from hostile_acts import ACTS, hostile_act
from test_kv_store import VirtualStore

from clusterkit._core.keys import KeyLayout
from clusterkit.etcd import EtcdClient
from clusterkit.testing import TestCluster, open_test_cluster

P = 8
LAYOUT = KeyLayout("/clusterkit")
SEEDS = range(4)


async def _act(cluster: TestCluster, rng: random.Random, act: str) -> None:
    op = cluster.store.client()
    try:
        victim = rng.choice(sorted(cluster.nodes))
        partition = rng.randrange(P) if act == "leader_leaseless" else 0
        await hostile_act(
            cast(EtcdClient, op),  # the memory client has EtcdClient's API
            LAYOUT,
            act,
            victim=victim,
            partition=partition,
            partitions=P,
            ghost_addr="memory:ghost",
            junk=200,
        )
    finally:
        await op.aclose()


async def _hostile_run(seed: int) -> tuple[int, list[tuple[str, Any, bytes]], list[str]]:
    rng = random.Random(seed)
    problems: list[str] = []
    async with open_test_cluster(
        partitions=P, replica_factor=3, session_ttl=2.0, rebalance_delay=1.0
    ) as cluster:
        store = VirtualStore(cluster)
        for name in ("n1", "n2", "n3"):
            await store.start(name)
        await cluster.wait_converged()
        nodes = dict(cluster.nodes)

        async def watch_versions() -> None:
            highest: dict[str, int] = {}
            while True:
                for name, node in nodes.items():
                    view_map = node.ck.view.map
                    version = view_map.version if view_map is not None else 0
                    if version < highest.get(name, 0):
                        problems.append(f"{name}: map version {highest[name]} -> {version}")
                    highest[name] = max(highest.get(name, 0), version)
                await trio.sleep(0.01)

        async def writer(w: int, stop: trio.Event) -> None:
            version = 0
            while not stop.is_set():
                version += 1
                for i in range(w, 120, 4):
                    await store.write(f"k{i:03d}", b"%d-%d" % (version, i))
                    await trio.sleep(0.01)

        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_versions)
            for w in range(4):
                nursery.start_soon(writer, w, stop)
            for act in rng.sample(ACTS, 6):
                await trio.sleep(rng.uniform(0.3, 3.0))
                await _act(cluster, rng, act)
            # Remove what clusterkit leaves to operators (junk, the ghost), then settle.
            op = cluster.store.client()
            await op.delete(LAYOUT.root + b"junk/", prefix=True)
            await op.delete(LAYOUT.node("ghost"))
            await op.aclose()
            await trio.sleep(5)
            stop.set()
            lost = await store.lost(P)
            nursery.cancel_scope.cancel()
        for name, node in nodes.items():
            if node.error is not None or name not in cluster.nodes:
                problems.append(f"{name} exited: {node.error!r}")
        return len(store.acked), lost, problems


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
async def test_hostile_state_under_writes_loses_nothing_and_stops_no_node(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    written, lost, problems = await _hostile_run(seed)
    assert written == 120
    assert lost == [], (seed, lost[:3])
    assert problems == [], (seed, problems[:5])
