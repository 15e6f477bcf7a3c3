"""The rebalancer actor fed views through its cell, on a fake etcd, under MockClock."""

from __future__ import annotations

import trio
import trio.testing
from fake_etcd import FakeEtcd

import clusterkit
from clusterkit._actors.cell import Latest
from clusterkit._actors.membership import Session
from clusterkit._actors.rebalancer import RebalancerActor
from clusterkit._core.keys import KeyLayout
from clusterkit._core.records import MapRecord, Node, decode_map
from clusterkit._core.view import ClusterView, Owner

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
        assert actor.statistics() == {"coordinator": 1, "maps_written": 1, "campaigns": 1}
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
