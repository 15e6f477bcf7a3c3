"""The rebalancer actor fed views through its cell, on a fake etcd, under MockClock."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from fake_etcd import FakeEtcd

import clusterkit
from clusterkit._actors.cell import Latest
from clusterkit._actors.membership import Session
from clusterkit._actors.rebalancer import RebalancerActor
from clusterkit._core.handoff import joining, plan
from clusterkit._core.keys import KeyLayout
from clusterkit._core.records import MapRecord, Node, decode_map, encode_map, encode_node
from clusterkit._core.view import ClusterView, Owner, ViewState
from clusterkit._testing.memory_etcd import MemoryEtcd, MemoryEtcdClient, open_memory_etcd
from clusterkit.etcd import EventType, Op

LAYOUT = KeyLayout("/ck")
TERM = 10  # the fake's first txn revision: our coordinator key's create_revision


def view(rev: int, nodes: set[str], record: MapRecord | None = None) -> ClusterView:
    return ClusterView(
        revision=rev,
        nodes={n: Node(n, "h") for n in nodes},
        map=record,
        map_revision=rev if record else 0,
        coordinator=Owner("me", TERM, 100),
        leaders={},
        ready=frozenset(),
    )


async def start(
    nursery: trio.Nursery, fake: FakeEtcd, delay: float = 5.0, max_delay: float = 20.0
) -> tuple[RebalancerActor, Latest[ClusterView]]:
    cfg = clusterkit.Config(
        node_id="me",
        partitions=8,
        replica_factor=2,
        rebalance_delay=delay,
        rebalance_max_delay=max_delay,
        metrics_port=None,
    )
    session: Latest[Session | None] = Latest(Session(100, 10, 1e9, 1))
    views: Latest[ClusterView] = Latest(view(TERM, {"me", "b"}))
    actor = RebalancerActor(fake.as_client(), cfg, LAYOUT, "me", session, views)
    await nursery.start(actor.run)
    return actor, views


def written_maps(fake: FakeEtcd) -> list[tuple[float, MapRecord]]:
    return [(t, decode_map(op.value)) for t, op in fake.puts if op.key == LAYOUT.map]


async def test_first_map_after_the_quiet_delay(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEtcd()
    async with trio.open_nursery() as nursery:
        actor, _ = await start(nursery, fake)
        while not written_maps(fake):
            await trio.sleep(0.1)
        ((t, record),) = written_maps(fake)
        # campaign txn at t=0 (1 ms), debounce from the first view, write 5 s later (+1 ms txn)
        assert 5.0 <= t <= 5.01
        assert record.version == 1 and record.node_ids() == {"me", "b"}
        stats = actor.statistics()
        assert stats["coordinator"] == stats["maps_written"] == stats["campaigns"] == 1
        nursery.cancel_scope.cancel()


async def test_flapping_node_inside_the_window_moves_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeEtcd()
    current = MapRecord(1, 8, 2, tuple(("me", "b") for _ in range(8)))
    async with trio.open_nursery() as nursery:
        _, views = await start(nursery, fake)
        views.set(view(20, {"me", "b"}, current))  # converged
        await trio.sleep(1)
        views.set(view(21, {"me", "b", "c"}, current))  # c joins ...
        await trio.sleep(3)
        views.set(view(22, {"me", "b"}, current))  # ... and is gone again within 5 s
        await trio.sleep(60)
        assert written_maps(fake) == []
        nursery.cancel_scope.cancel()


async def test_constant_churn_cannot_starve_rebalancing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeEtcd()
    current = MapRecord(1, 8, 2, tuple(("me", "b") for _ in range(8)))
    async with trio.open_nursery() as nursery:
        _, views = await start(nursery, fake, delay=5.0, max_delay=12.0)
        views.set(view(20, {"me", "b"}, current))
        start_churn = trio.current_time()
        for i in range(30):  # a new member set every 2 s, never 5 s of quiet
            views.set(view(30 + i, {"me", "b", f"x{i}"}, current))
            await trio.sleep(2)
            if written_maps(fake):
                break
        ((t, record),) = written_maps(fake)[:1]
        assert t - start_churn <= 12.01
        assert record.version == 2
        nursery.cancel_scope.cancel()


async def test_deposed_coordinator_stops_writing(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEtcd()
    async with trio.open_nursery() as nursery:
        actor, views = await start(nursery, fake)
        await trio.sleep(1)
        assert actor.term == TERM
        other = view(15, {"me", "b"})
        views.set(ClusterView(15, other.nodes, None, 0, Owner("b", 14, 7), {}, frozenset()))
        await trio.sleep(30)
        assert actor.term is None
        assert written_maps(fake) == []
        nursery.cancel_scope.cancel()


# -- back-pressure and map repair, on the in-memory etcd (virtual time) -----------------------


@dataclass
class Scene:
    """An in-memory etcd, a view mirror of the prefix and the counts a join is judged by."""

    store: MemoryEtcd
    client: MemoryEtcdClient
    lease: int
    views: Latest[ClusterView]
    revisions: dict[str, set[int]] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return len(self.revisions.get(kind, ()))

    async def mirror(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        state = ViewState(LAYOUT)
        loaded = await self.client.get_prefix(LAYOUT.root)
        for kv in loaded.kvs:
            state.apply(
                kv.key,
                kv.value,
                create_revision=kv.create_revision,
                mod_revision=kv.mod_revision,
                lease=kv.lease,
            )
        self.views.set(state.snapshot(loaded.revision))
        task_status.started()
        async with self.client.watch(
            LAYOUT.root, prefix=True, start_revision=loaded.revision + 1
        ) as watch:
            async for batch in watch:
                for event in batch.events:
                    kv = event.kv
                    parsed = LAYOUT.parse(kv.key)
                    kind = parsed.kind if parsed is not None else "other"
                    self.revisions.setdefault(kind, set()).add(kv.mod_revision)
                    state.apply(
                        kv.key,
                        kv.value if event.type is EventType.PUT else None,
                        create_revision=kv.create_revision,
                        mod_revision=kv.mod_revision,
                        lease=kv.lease,
                    )
                self.views.set(state.snapshot(batch.revision))


@asynccontextmanager
async def scene(
    partitions: int, replica_factor: int, nodes: list[str], record: MapRecord | None
) -> AsyncIterator[tuple[Scene, trio.Nursery]]:
    async with open_memory_etcd() as store, trio.open_nursery() as nursery:
        client = store.client()
        lease = (await client.lease_grant(3600)).id
        for n in nodes:
            await client.put(LAYOUT.node(n), encode_node(Node(n, "h")), lease=lease)
        if record is not None:
            await client.put(LAYOUT.map, encode_map(record))
        views: Latest[ClusterView] = Latest(view(0, set()))
        s = Scene(store, client, lease, views)
        await nursery.start(s.mirror)
        yield s, nursery
        nursery.cancel_scope.cancel()


async def start_coordinator(
    s: Scene, nursery: trio.Nursery, partitions: int, replica_factor: int
) -> RebalancerActor:
    cfg = clusterkit.Config(
        node_id="me",
        partitions=partitions,
        replica_factor=replica_factor,
        rebalance_delay=0.5,
        metrics_port=None,
    )
    session: Latest[Session | None] = Latest(Session(s.lease, 3600, 1e9, 1))
    actor = RebalancerActor(s.client, cfg, LAYOUT, "me", session, s.views)  # type: ignore[arg-type]
    await nursery.start(actor.run)
    return actor


async def joining_node(
    s: Scene, node: str, *, batch: int, every: float, lease: int | None = None
) -> None:
    """Write ``node``'s ready markers for what the stored map announces, ``batch`` per Txn."""
    written: set[int] = set()
    version = -1
    while True:
        current, version = await s.views.wait_newer(version)
        record = current.map
        if record is None:
            continue
        todo = sorted(pt for pt in record.pending if node in joining(record, pt))
        todo = [pt for pt in todo if pt not in written]
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            await s.client.txn(
                [],
                [Op.put(LAYOUT.ready(pt, node), "1", lease=lease or s.lease) for pt in chunk],
            )
            written.update(chunk)
            if every:
                await trio.sleep(every)


async def settled(s: Scene, nodes: set[str], r: int) -> ClusterView:
    with trio.fail_after(120):
        current = await s.views.wait_for(
            lambda v: v.map is not None and not v.map.pending and v.map.node_ids() == nodes
        )
    assert current.map is not None
    assert all(len(row) == min(r, len(nodes)) for row in current.map.replicas)
    return current


P_BIG, R_BIG = 4096, 3
EIGHT = [f"n{i}" for i in range(7)] + ["me"]


async def test_a_join_at_p4096_commits_a_trickle_of_markers_in_a_few_maps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first = plan(None, EIGHT, (), (), P_BIG, R_BIG).record
    async with scene(P_BIG, R_BIG, EIGHT, first) as (s, nursery):
        actor = await start_coordinator(s, nursery, P_BIG, R_BIG)
        await trio.sleep(5)
        assert actor.maps_written == 0  # the stored map covers the members
        before = s.store.revision
        start = trio.current_time()
        nursery.start_soon(functools.partial(joining_node, s, "new", batch=128, every=0.1))
        await s.client.put(LAYOUT.node("new"), encode_node(Node("new", "h")), lease=s.lease)
        final = await settled(s, {*EIGHT, "new"}, R_BIG)
        elapsed = trio.current_time() - start
        moved = sum(1 for row in final.map.replicas if "new" in row) if final.map else 0
        assert moved >= P_BIG * R_BIG // 9 - 1
        stats = actor.statistics()
        assert stats["plans_written"] == 1  # one planned move, however many markers
        # ~11 marker Txns over ~1.1 s: a commit per 0.25 s window at most, plus the last
        assert 1 <= stats["commits_written"] <= elapsed / 0.25 + 2
        assert stats["conflicts"] == 0 and stats["campaigns"] == 1
        # etcd revisions of the whole join: node key, markers, maps (no leaders here)
        join_revisions = s.store.revision - before
        assert join_revisions <= 20 + moved / 32
        assert s.count("map") == stats["maps_written"]


async def test_markers_that_arrive_at_once_commit_in_one_map(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first = plan(None, EIGHT, (), (), P_BIG, R_BIG).record
    async with scene(P_BIG, R_BIG, EIGHT, first) as (s, nursery):
        actor = await start_coordinator(s, nursery, P_BIG, R_BIG)
        nursery.start_soon(functools.partial(joining_node, s, "new", batch=128, every=0))
        await s.client.put(LAYOUT.node("new"), encode_node(Node("new", "h")), lease=s.lease)
        await settled(s, {*EIGHT, "new"}, R_BIG)
        assert actor.statistics()["plans_written"] == 1
        assert actor.statistics()["commits_written"] == 1


async def test_stale_markers_beyond_max_txn_ops_are_deleted_in_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every replica holds a marker (as after earlier joins): a join makes ~1,365 of them
    stale, far more than one Txn may delete (the memory etcd refuses > 128 ops like etcd)."""
    first = plan(None, EIGHT, (), (), P_BIG, R_BIG).record
    async with scene(P_BIG, R_BIG, EIGHT, first) as (s, nursery):
        markers = [(pt, n) for pt, row in enumerate(first.replicas) for n in row]
        for i in range(0, len(markers), 128):
            ops = [
                Op.put(LAYOUT.ready(pt, n), "1", lease=s.lease) for pt, n in markers[i : i + 128]
            ]
            await s.client.txn([], ops)
        actor = await start_coordinator(s, nursery, P_BIG, R_BIG)
        nursery.start_soon(functools.partial(joining_node, s, "new", batch=128, every=0.05))
        await s.client.put(LAYOUT.node("new"), encode_node(Node("new", "h")), lease=s.lease)
        final = await settled(s, {*EIGHT, "new"}, R_BIG)
        assert final.map is not None
        await trio.sleep(1)
        left = (await s.client.get_prefix(LAYOUT.ready_prefix)).kvs
        for kv in left:
            parsed = LAYOUT.parse(kv.key)
            assert parsed is not None
            assert parsed.node_id in final.map.replicas[parsed.partition]
        assert actor.statistics()["delete_txns"] >= 1 and actor.statistics()["conflicts"] == 0


def small_map(version: int) -> MapRecord:
    return MapRecord(
        version, 8, 2, tuple(("me", "b") if pt % 2 else ("b", "me") for pt in range(8))
    )


async def stored(s: Scene) -> MapRecord:
    kv = await s.client.get(LAYOUT.map)
    assert kv is not None
    return decode_map(kv.value)


@pytest.mark.parametrize(
    "damage",
    [
        b"not json",
        None,  # deleted
        encode_map(MapRecord(40, 4, 2, (("me", "b"),) * 4)),  # another shape, newer
        encode_map(small_map(2)),  # older than the map the nodes have seen
    ],
)
async def test_a_bad_stored_map_is_replaced_by_the_last_good_one(
    autojump_clock: trio.testing.MockClock, damage: bytes | None
) -> None:
    good = small_map(5)
    async with scene(8, 2, ["me", "b"], good) as (s, nursery):
        actor = await start_coordinator(s, nursery, 8, 2)
        await trio.sleep(2)
        assert actor.maps_written == 0
        if damage is None:
            await s.client.delete(LAYOUT.map)
        else:
            await s.client.put(LAYOUT.map, damage)
        with trio.fail_after(10):
            await s.views.wait_for(
                lambda v: v.map is not None and v.map.partitions == 8 and v.map.version > 5
            )
        repaired = await stored(s)
        assert repaired.replicas == good.replicas and repaired.pending == good.pending
        # above both the last good version and a readable stored one; never replanned
        assert repaired.version == (41 if b"40" in (damage or b"") else 6)
        assert actor.statistics()["repairs_written"] == 1
        assert actor.statistics()["plans_written"] == 0
        assert actor.statistics()["map_problems"] == 1
        await trio.sleep(5)
        assert actor.maps_written == 1  # and nothing after it


async def test_garbage_in_a_fresh_prefix_is_planned_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(8, 2, ["me", "b"], None) as (s, nursery):
        await s.client.put(LAYOUT.map, b"garbage")
        actor = await start_coordinator(s, nursery, 8, 2)
        with trio.fail_after(10):
            await s.views.wait_for(lambda v: v.map is not None)
        assert (await stored(s)).version == 1 and actor.statistics()["plans_written"] == 1


async def test_no_good_map_known_in_a_working_cluster_means_no_write_and_no_exit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A node that never saw a good map must not replan a cluster that serves data (its
    leaders show it) from nothing: it leaves coordinating to nodes that remember the map."""
    async with scene(8, 2, ["me", "b"], None) as (s, nursery):
        await s.client.put(LAYOUT.map, b"garbage")
        await s.client.put(LAYOUT.leader(3), "b", lease=s.lease)
        actor = await start_coordinator(s, nursery, 8, 2)
        await trio.sleep(10)
        assert actor.maps_written == 0 and actor.term is None
        assert (await s.client.get(LAYOUT.map)) is not None
        assert (await s.client.get(LAYOUT.coordinator)) is None  # left to a node that can plan
        # the operator deletes the garbage: a fresh cluster, planned from scratch
        await s.client.delete(LAYOUT.map)
        await s.client.delete(LAYOUT.leader(3))
        with trio.fail_after(10):
            await s.views.wait_for(lambda v: v.map is not None)
        assert (await stored(s)).version == 1


async def test_a_coordinator_of_another_shape_does_nothing_and_does_not_raise(
    autojump_clock: trio.testing.MockClock,
) -> None:
    other = MapRecord(3, 16, 2, (("me", "b"),) * 16)
    async with scene(8, 2, ["me", "b"], other) as (s, nursery):
        actor = await start_coordinator(s, nursery, 8, 2)
        await trio.sleep(10)
        assert actor.maps_written == 0 and actor.term is None
        assert (await stored(s)) == other


async def test_a_map_deleted_after_a_cold_start_and_again_is_restored_each_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene(8, 2, ["me", "b"], None) as (s, nursery):
        actor = await start_coordinator(s, nursery, 8, 2)
        with trio.fail_after(10):
            await s.views.wait_for(lambda v: v.map is not None)
        first = await stored(s)
        for version in (2, 3):
            await s.client.delete(LAYOUT.map)
            with trio.fail_after(10):
                await s.views.wait_for(functools.partial(has_version, version))
            again = await stored(s)
            assert again.version == version and again.replicas == first.replicas
        assert actor.statistics()["repairs_written"] == 2


def has_version(version: int, v: ClusterView) -> bool:
    return v.map is not None and v.map.version == version
