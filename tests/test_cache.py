"""The distributed cache example (examples/cache): its memory, and the whole system under
faults on real etcd (node processes) and in virtual time (seeded random faults)."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

import clusterkit
from clusterkit.testing import TestCluster, open_test_cluster
from examples.cache.cache import OVERHEAD, TOMBSTONE_TTL, Cache
from examples.cache.demo import run
from examples.cache.node import CacheNode

# -- the pure cache ----------------------------------------------------------------------------


def test_newer_versions_win_and_deletes_leave_tombstones() -> None:
    cache = Cache(1 << 20)
    assert cache.apply(0, b"k", b"v2", (1, 2), 10, now=0)
    assert not cache.apply(0, b"k", b"v1", (1, 1), 10, now=0)  # a late, older copy
    assert cache.get(0, b"k", now=1).value == b"v2"  # type: ignore[union-attr]
    assert cache.apply(0, b"k", None, (2, 1), 10, now=1)  # a delete from a newer leader
    assert cache.get(0, b"k", now=2) is None
    assert not cache.apply(0, b"k", b"v2", (1, 2), 10, now=2)  # cannot come back
    assert cache.get(0, b"k", now=1 + TOMBSTONE_TTL + 1) is None  # the tombstone expired too
    assert cache.apply(0, b"k", b"v3", (1, 3), 10, now=100)  # ...so the key is free again


def test_ttl_expiry_and_the_leaders_stamps() -> None:
    cache = Cache(1 << 20)
    cache.apply(3, b"a", b"x", cache.stamp(3, epoch=7), 5, now=0)
    assert cache.stamp(3, epoch=7) == (7, 2)
    assert cache.stamp(3, epoch=9) == (9, 3)  # a new leader's epoch dominates
    assert cache.get(3, b"a", now=4.9) is not None
    assert cache.get(3, b"a", now=5.0) is None and cache.expirations == 1
    assert cache.bytes == 0


def test_memory_stays_within_the_bound_by_lru_eviction() -> None:
    rng = random.Random(1)
    bound = 64 * 1024
    cache = Cache(bound)
    cache.apply(0, b"hot", b"h" * 100, (1, 1), 100, now=0)
    cache.apply(0, b"cold", b"c" * 100, (1, 2), 100, now=0)
    for i in range(5000):
        key = b"k%d" % rng.randrange(2000)
        cache.apply(i % 8, key, b"v" * rng.randrange(1, 900), (1, i + 3), 100, now=0)
        if i % 7 == 0:
            assert cache.get(0, b"hot", now=0) is not None  # used often: never evicted
        assert cache.bytes <= bound
    assert cache.evictions > 0
    assert cache.get(0, b"cold", now=0) is None  # least recently used: evicted long ago
    charged = sum(len(k) + len(i.value or b"") + OVERHEAD for (_, k), i in cache._lru.items())
    assert charged == cache.bytes


def test_entries_and_drop() -> None:
    cache = Cache(1 << 20)
    for i, key in enumerate([b"c", b"a", b"b"]):
        cache.apply(1, key, key * 2, (1, i + 1), 10, now=0)
    cache.apply(2, b"z", b"zz", (1, 1), 10, now=0)
    assert [k for k, _, _ in cache.entries(1, None, now=1)] == [b"a", b"b", b"c"]
    assert [k for k, _, _ in cache.entries(1, b"a", now=1)] == [b"b", b"c"]
    assert all(left == 9 for _, _, left in cache.entries(1, None, now=1))
    cache.drop(1)
    assert cache.partitions() == {2} and len(cache) == 1


# -- the system on real etcd, every node in its own process ---------------------------------


@pytest.mark.slow
async def test_demo_no_stale_leader_read_and_memory_bounded_through_kill_and_join() -> None:
    lines: list[str] = []
    with trio.fail_after(180):
        report = await run(
            seconds=5.0, workers=8, keys=2_000, max_bytes=512 * 1024, log=lines.append
        )
    print("\n".join(lines + report.lines()))
    assert report.killed == "n2" and report.joined == "n4"
    assert report.writes > 100 and sum(report.reads.values()) > 1_000
    assert report.stale["leader"] == 0 and report.wrong == 0
    assert report.hit_ratio() > 0.5
    assert set(report.memory) == {"n1", "n3", "n4"}
    for stats in report.memory.values():
        assert 0 < stats["bytes"] <= stats["max_bytes"]
    assert sum(s["evictions"] for s in report.memory.values()) > 0  # the bound was reached


# -- the same nodes in virtual time, with seeded random faults --------------------------------


class VirtualCache:
    """Cache nodes on a clusterkit.testing cluster; writes and reads through the leaders."""

    def __init__(self, cluster: TestCluster, warmup: str) -> None:
        self.cluster = cluster
        self.warmup = warmup
        self.nodes: dict[str, CacheNode] = {}
        self.acked: dict[bytes, tuple[tuple[int, int], bytes | None]] = {}

    async def start(self, node_id: str) -> None:
        node = self.nodes[node_id] = CacheNode(node_id, max_bytes=64 << 20, warmup=self.warmup)
        await self.cluster.start(
            node_id,
            setup=node.attach,
            on_partition_assigned=node.on_partition_assigned,
            on_partition_unassigned=node.on_partition_unassigned,
        )

    def leader(self, key: bytes) -> CacheNode | None:
        live = [self.nodes[n] for n in self.cluster.nodes]
        return next((n for n in live if n.ck.is_leader(n.ck.get_partition(key))), None)

    async def write(self, key: bytes, value: bytes | None) -> None:
        with trio.move_on_after(60):
            while True:
                node = self.leader(key)
                if node is not None:
                    try:
                        version = await node.write(key, value, ttl=3600)
                    except clusterkit.ClusterKitError:
                        pass
                    else:
                        if key not in self.acked or self.acked[key][0] < version:
                            self.acked[key] = (version, value)
                        return
                await trio.sleep(0.05)

    async def stale(
        self, partitions: int, *, misses_allowed: bool = False
    ) -> list[tuple[bytes, object, object]]:
        """Once settled: acknowledged writes whose leader serves something older (or nothing,
        unless ``misses_allowed``: a cold replica starts empty)."""
        with trio.fail_after(120):
            await self.cluster.wait_converged()
            for n in self.cluster.nodes.values():
                await n.ck._views.wait_for(lambda v: len(v.leaders) == partitions)
        bad: list[tuple[bytes, object, object]] = []
        for key, (version, value) in self.acked.items():
            with trio.fail_after(30):
                while (leader := self.leader(key)) is None or leader.ck.get_partition(
                    key
                ) not in leader.ready:
                    await trio.sleep(0.1)
            got, seen = leader.read(key)
            if got is None and misses_allowed:
                continue
            if (value is None and got is not None) or (
                value is not None and (got, seen) != (value, version)
            ):
                bad.append((key, (got, seen), (value, version)))
        return bad


async def _random_faults(
    seed: int, warmup: str
) -> tuple[int, int, list[str], list[tuple[bytes, object, object]]]:
    rng = random.Random(seed)
    async with open_test_cluster(
        partitions=8, replica_factor=2, session_ttl=2.0, rebalance_delay=1.0
    ) as cluster:
        system = VirtualCache(cluster, warmup)
        names = (f"n{i}" for i in range(1, 100))
        done: list[str] = []
        for _ in range(3):
            await system.start(next(names))
        await cluster.wait_converged()
        for i in range(100):
            await system.write(b"cold-%03d" % i, b"cold")
        stop = trio.Event()

        async def writer(w: int) -> None:
            version = 0
            while not stop.is_set():
                version += 1
                for i in range(w, 120, 4):
                    delete = rng.random() < 0.1
                    await system.write(b"hot-%03d" % i, None if delete else b"%d-%d" % (version, i))
                    await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(writer, w)
            for _ in range(5):
                await trio.sleep(rng.uniform(0.5, 4))
                live = sorted(cluster.nodes)
                op = rng.choice(["kill", "join", "drain"])
                if op == "kill" and len(live) > 2:
                    await cluster.kill(rng.choice(live))
                elif op == "join":
                    await system.start(next(names))
                elif op == "drain" and len(live) > 2:
                    with trio.move_on_after(30):
                        await cluster.stop(rng.choice(live), drain=True)
                else:
                    continue
                done.append(op)
            await trio.sleep(3)
            stop.set()
        stale = await system.stale(8, misses_allowed=warmup == "cold")
        warmed = sum(n.stats["warmed"] for n in system.nodes.values())
        return len(system.acked), warmed, done, stale


@pytest.mark.parametrize("seed", range(4))
async def test_virtual_time_faults_leave_no_stale_leader_value(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    written, warmed, faults, stale = await _random_faults(seed, "pull")
    assert written == 220 and stale == [], (seed, faults, stale[:3])
    assert faults and warmed > 0  # faults happened, and data moved by warm-up pulls


async def test_cold_warmup_never_serves_an_older_value(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """--warmup cold: a new replica starts empty, so a key may be missing after a move (a
    miss), but a leader never serves a value older than an acknowledged write."""
    written, warmed, faults, stale = await _random_faults(1, "cold")
    assert written == 220 and faults and stale == [], (faults, stale[:3])
    assert warmed == 0  # nothing was copied
