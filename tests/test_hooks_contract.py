"""What the Go README's examples rely on: epochs on the leader, hook arguments, hook timing.

Virtual time (clusterkit.testing), so every millisecond can be sampled deterministically.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

import clusterkit
from clusterkit.testing import TestCluster, open_test_cluster

P = 16


async def _sample_epochs(cluster: TestCluster, bad: list[str], stop: trio.Event) -> None:
    """Every virtual millisecond, on every node: is_leader(pt) implies leader_epoch(pt) is
    the epoch that node won (and get_leader(pt) is the node itself)."""
    while not stop.is_set():
        for node in list(cluster.nodes.values()):
            ck = node.ck
            for pt in range(P):
                if ck.is_leader(pt):
                    won = ck._leadership.epochs.get(pt)
                    epoch = ck.leader_epoch(pt)
                    leader = ck.get_leader(pt)
                    if epoch is None or epoch != won or leader is None or leader.id != ck.node_id:
                        bad.append(f"{ck.node_id} pt={pt} won={won} epoch={epoch} {leader}")
        await trio.sleep(0.001)


async def test_leader_epoch_agrees_with_is_leader_at_every_instant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bad: list[str] = []
    stop = trio.Event()
    settings: dict[str, Any] = dict(partitions=P, replica_factor=2, session_ttl=2.0)
    async with open_test_cluster(**settings) as cluster, trio.open_nursery() as nursery:
        nursery.start_soon(_sample_epochs, cluster, bad, stop)
        for name in ("a", "b", "c"):  # cold start
            await cluster.start(name)
        await cluster.wait_converged()
        with trio.fail_after(30):
            await cluster.nodes["a"].ck._views.wait_for(lambda v: len(v.leaders) == P)
        await cluster.stop("a")  # graceful failover
        await cluster.wait_converged()
        await cluster.kill("b")  # crash failover
        await cluster.wait_converged()
        with trio.fail_after(30):
            await cluster.nodes["c"].ck._views.wait_for(
                lambda v: all(o.node_id == "c" for o in v.leaders.values()) and len(v.leaders) == P
            )
        stop.set()
    assert bad == []


async def test_unassigned_names_the_node_that_took_this_ones_place(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A join moves replicas only onto the new node: every on_partition_unassigned of the
    old nodes names it, and the joiner's on_partition_assigned names a live old replica."""
    unassigned: list[tuple[str, int, str | None]] = []
    assigned: list[tuple[int, str | None]] = []

    def on_unassigned(me: str) -> Any:
        def hook(pt: int, new_owner: clusterkit.Node | None) -> None:
            unassigned.append((me, pt, new_owner.id if new_owner else None))

        return hook

    def on_assigned(pt: int, previous: clusterkit.Node | None) -> None:
        assigned.append((pt, previous.id if previous else None))

    async with open_test_cluster(partitions=P, replica_factor=2, rebalance_delay=0.2) as cluster:
        for name in ("a", "b", "c"):
            await cluster.start(name, on_partition_unassigned=on_unassigned(name))
        await cluster.wait_converged()
        await cluster.start("d", on_partition_assigned=on_assigned)
        await cluster.wait_converged()
        with trio.fail_after(30):  # the hooks of the committed moves run after the map
            while not assigned or len(unassigned) < len(assigned):
                await trio.sleep(0.01)
        assert {owner for _, _, owner in unassigned} == {"d"}
        assert len(assigned) == len(unassigned)
        assert all(prev in {"a", "b", "c"} for _, prev in assigned)


async def test_no_hook_runs_before_the_app_has_its_handle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The Go README's migration example, written naively: the assigned hook uses the handle
    the ``async with`` block received."""
    handles: dict[str, clusterkit.ClusterKit] = {}
    missing: list[tuple[str, int]] = []
    calls = 0

    def assigned_for(me: str) -> Any:
        async def hook(pt: int, previous: clusterkit.Node | None) -> None:
            nonlocal calls
            calls += 1
            ck = handles.get(me)
            if ck is None:
                missing.append((me, pt))
                return
            ck.get_replicas(pt)  # what a pull would start with

        return hook

    async with open_test_cluster(partitions=P, replica_factor=2) as cluster:
        for name in ("a", "b"):
            node = await cluster.start(name, on_partition_assigned=assigned_for(name))
            handles[name] = node.ck
        await cluster.wait_converged()
        with trio.fail_after(30):
            while calls < 2 * P:
                await trio.sleep(0.01)
    assert missing == []
