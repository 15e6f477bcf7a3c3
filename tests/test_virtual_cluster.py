"""Hundreds of randomized faults on a virtual-time cluster (clusterkit.testing).

Every run starts real clusterkit nodes on the in-memory etcd under MockClock and applies a
random sequence of joins, graceful leaves, drains, crashes, cut-offs from etcd and
compactions. A sampler checks, at every virtual millisecond-scale step, that no two nodes
claim the same partition, that epochs only grow, and, per node incarnation, that the hook
sequence of every partition is well formed. After the faults, every partition must regain a
leader and the map must converge.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

import clusterkit
from clusterkit.testing import TestCluster, open_test_cluster

P = 8
RUNS = 60
OPS = 8


class Invariants:
    def __init__(self, cluster: TestCluster) -> None:
        self.cluster = cluster
        self.overlaps: list[tuple[float, int, list[str]]] = []
        self.epochs: dict[int, list[int]] = defaultdict(list)
        self.hooks: dict[tuple[str, int], list[str]] = defaultdict(list)
        self.incarnation: dict[str, int] = defaultdict(int)

    def hook_config(self, node_id: str) -> dict[str, Any]:
        self.incarnation[node_id] += 1
        key = f"{node_id}#{self.incarnation[node_id]}"

        def record(name: str) -> Callable[..., None]:
            def hook(pt: int, *_: Any) -> None:
                self.hooks[(key, pt)].append(name)

            return hook

        return {
            "on_partition_assigned": record("assigned"),
            "on_partition_unassigned": record("unassigned"),
            "on_leader_elected": record("elected"),
            "on_leader_lost": record("lost"),
        }

    def sample(self) -> None:
        for pt in range(P):
            leaders = [n for n in self.cluster.nodes.values() if n.ck.is_leader(pt)]
            if len(leaders) > 1:
                self.overlaps.append((trio.current_time(), pt, [n.node_id for n in leaders]))
            for n in leaders:
                epoch = n.ck._leadership.epochs.get(pt)
                seen = self.epochs[pt]
                if epoch is not None and (not seen or seen[-1] != epoch):
                    seen.append(epoch)

    async def run(self) -> None:
        while True:
            self.sample()
            await trio.sleep(0.005)

    def check(self) -> None:
        assert self.overlaps == []
        for pt, epochs in self.epochs.items():
            assert epochs == sorted(set(epochs)), (pt, epochs)
        for key, seq in self.hooks.items():
            state = "out"
            for hook in seq:
                nxt = {
                    ("out", "assigned"): "in",
                    ("in", "assigned"): "in",  # a re-sync after a rejoin
                    ("in", "elected"): "lead",
                    ("lead", "lost"): "in",
                    ("in", "unassigned"): "out",
                }.get((state, hook))
                assert nxt is not None, f"{key}: {hook} in state {state}: {seq}"
                state = nxt


async def one_run(seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    settings = {"partitions": P, "replica_factor": 2, "session_ttl": 3.0, "rebalance_delay": 0.5}
    async with open_test_cluster(**settings) as cluster, trio.open_nursery() as nursery:
        inv = Invariants(cluster)
        nursery.start_soon(inv.run)
        counter = 0

        async def add() -> None:
            nonlocal counter
            counter += 1
            name = f"n{counter}"
            await cluster.start(name, **inv.hook_config(name))

        for _ in range(3):
            await add()
        cut: set[str] = set()
        for _ in range(OPS):
            op = rng.choice(["join", "leave", "drain", "kill", "cut", "restore", "compact"])
            live = sorted(n for n in cluster.nodes if n not in cut)
            if op == "join" or len(live) < 2:
                await add()
            elif op == "leave":
                await cluster.stop(rng.choice(live))
            elif op == "drain":
                with trio.fail_after(60):
                    await cluster.stop(rng.choice(live), drain=True)
            elif op == "kill":
                victim = rng.choice(live)
                await cluster.kill(victim)
            elif op == "cut":
                victim = rng.choice(live)
                cluster.nodes[victim].cut()
                cut.add(victim)
            elif op == "restore" and cut:
                victim = cut.pop()
                if victim in cluster.nodes:
                    cluster.nodes[victim].restore()
            elif op == "compact" and cluster.store.revision > cluster.store.compact_revision:
                cluster.store.compact(cluster.store.revision)
            inv.sample()
            await trio.sleep(rng.uniform(0.0, 4.0))
        for name in list(cut):
            if name in cluster.nodes:
                cluster.nodes[name].restore()
        with trio.fail_after(120):
            await cluster.wait_converged()
            while not all(
                sum(n.ck.is_leader(pt) for n in cluster.nodes.values()) == 1 for pt in range(P)
            ):
                await trio.sleep(0.05)
        inv.sample()
        nursery.cancel_scope.cancel()
    inv.check()
    errors = [n.error for n in cluster.nodes.values() if n.error is not None]
    assert errors == []
    return len(inv.epochs), sum(len(e) for e in inv.epochs.values())


@pytest.mark.slow
async def test_randomized_faults_keep_every_invariant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    elections = 0
    for seed in range(RUNS):
        led, epochs = await one_run(seed)
        assert led == P  # every partition had a leader at some point
        elections += epochs
    assert elections >= RUNS * P


async def test_a_node_that_rejoins_resyncs_every_partition_before_leading_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cut off beyond its TTL and back within the rebalance delay, the map never changes; the
    node still hears on_partition_assigned again (a re-sync) for every partition it holds,
    each before it leads that partition again."""
    log: list[tuple[str, int, bool]] = []

    def assigned(pt: int, previous: Any) -> None:
        log.append(("assigned", pt, previous is not None))

    def elected(pt: int) -> None:
        log.append(("elected", pt, False))

    async with open_test_cluster(
        partitions=P, replica_factor=3, session_ttl=2.0, rebalance_delay=30.0
    ) as cluster:
        a = await cluster.start("a", on_partition_assigned=assigned, on_leader_elected=elected)
        await cluster.start("b")
        await cluster.start("c")
        await cluster.wait_converged()
        with trio.fail_after(60):
            await a.ck._views.wait_for(lambda v: len(v.leaders) == P)
        version = a.ck.view.map.version if a.ck.view.map else None
        led_before = {pt for pt in range(P) if a.ck.is_leader(pt)}
        assert led_before  # a is the preferred replica of some partitions
        # is_leader turns true before on_leader_elected runs (hooks queue on
        # hook_concurrency): let every election's hook run before the log is cleared.
        with trio.fail_after(60):
            while not led_before <= {pt for kind, pt, _ in log if kind == "elected"}:
                await trio.sleep(0.01)
        log.clear()

        a.cut()
        await trio.sleep(5.0)  # virtual: beyond the 2 s TTL; the others take a's partitions
        assert not any(a.ck.is_leader(pt) for pt in range(P))
        a.restore()
        with trio.fail_after(60):
            await a.ck._views.wait_for(
                lambda v: "a" in v.nodes and all(v.leaders.get(pt) for pt in led_before)
            )
            while not all(a.ck.is_leader(pt) for pt in led_before):  # preferred hand-back
                await trio.sleep(0.1)
        assert a.ck.view.map is not None and a.ck.view.map.version == version  # no map change
        resynced = {pt for kind, pt, _ in log if kind == "assigned"}
        assert resynced == set(range(P))  # R = N = 3: a holds every partition
        assert all(had_source for kind, _, had_source in log if kind == "assigned")
        for pt in led_before:  # re-synced before it led again
            kinds = [kind for kind, p, _ in log if p == pt]
            assert kinds.index("assigned") < kinds.index("elected"), kinds


async def test_setup_runs_with_the_handle_before_any_hook(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """open_cluster(cfg, setup=...): what the app registers there (handlers, a migration
    source) is in place before the first hook runs, even when setup itself waits."""
    ready: dict[str, bool] = {}
    hook_saw: list[bool] = []

    def hooks(node_id: str) -> dict[str, Any]:
        async def on_partition_assigned(pt: int, previous: Any) -> None:
            hook_saw.append(ready.get(node_id, False))

        return {"on_partition_assigned": on_partition_assigned}

    def setup_for(node_id: str) -> Callable[[Any], Any]:
        async def setup(ck: Any) -> None:
            assert ck.node_id == node_id
            await trio.sleep(2)  # longer than the rebalance delay: hooks would be due
            ready[node_id] = True

        return setup

    async with open_test_cluster(partitions=8, replica_factor=2, rebalance_delay=0.5) as c:
        await c.start("a", setup=setup_for("a"), **hooks("a"))
        await c.start("b", setup=setup_for("b"), **hooks("b"))
        await c.wait_converged()
        with trio.fail_after(30):
            while len(hook_saw) < 16:
                await trio.sleep(0.1)
        assert all(hook_saw) and len(hook_saw) >= 16

    async def broken(ck: Any) -> None:
        raise RuntimeError("setup failed")

    async with open_test_cluster(partitions=4, replica_factor=1) as c:
        with pytest.raises(RuntimeError, match="setup failed"):
            await c.start("x", setup=broken)


async def test_streams_of_one_push_never_apply_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three streams of the same transfer arrive together (a pusher that resumed twice): each
    takes the transfer over from the one before, so the sink never runs for two at once."""
    async with open_test_cluster(partitions=4, replica_factor=1) as c:
        node = await c.start("a")
        migration = node.ck.migration
        running = [0]
        overlaps = [0]

        @migration.sink
        async def sink(pt: int, entries: list[clusterkit.MigrationEntry]) -> None:
            running[0] += 1
            overlaps[0] += running[0] > 1
            try:
                await trio.sleep(1)
            finally:
                running[0] -= 1

        def stream(start: int) -> Callable[[], Any]:
            sent = [0]

            async def next_batch() -> Any:
                if sent[0] == 3:
                    return None
                sent[0] += 1
                key = b"k%d-%d" % (start, sent[0])
                return {"partition": 1, "kvs": [{"key": key, "value": b"v"}], "resume_token": key}

            return next_batch

        outcomes: list[str] = []

        async def push(i: int) -> None:
            try:
                await migration._apply_push(1, "t", None, stream(i), "peer")
                outcomes.append("done")
            except clusterkit.RemoteError as exc:
                outcomes.append(exc.remote_type)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(push, i)
        assert overlaps[0] == 0
        assert sorted(outcomes) == ["Superseded", "Superseded", "done"]
