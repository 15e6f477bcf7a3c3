"""A resign that etcd does not answer must not leave a leader key behind.

The key lives under the node's lease, which stays alive as long as the node does: if nothing
tried again, the partition would have no leader for as long as the old leader lives. These
runs fail the first resigns of the cluster (the batcher raises ``EtcdTimeout``, as when etcd
is slow to answer) while leaders leave their partitions, and require every partition to end
up led by its preferred replica, with the failed resigns retried.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from clusterkit._actors.batcher import EtcdBatcher
from clusterkit._errors import EtcdTimeout
from clusterkit.testing import TestCluster, open_test_cluster

P = 8


class FailingResigns:
    """Patches EtcdBatcher.resign: the first ``count`` calls raise without reaching etcd."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.left = count
        self.failed = 0
        self.calls = 0
        original = EtcdBatcher.resign

        async def resign(batcher: EtcdBatcher, key: bytes, epoch: int) -> None:
            self.calls += 1
            if self.left > 0:
                self.left -= 1
                self.failed += 1
                raise EtcdTimeout("resign: injected timeout")
            await original(batcher, key, epoch)

        monkeypatch.setattr(EtcdBatcher, "resign", resign)


async def wait_preferred_leaders(cluster: TestCluster) -> None:
    """Every partition is led by the first replica of its row (view and is_leader agree)."""

    def settled() -> bool:
        for node in cluster.nodes.values():
            view = node.ck.view
            if view.map is None or view.map.pending:
                return False
            for pt in range(P):
                preferred = view.map.replicas[pt][0]
                owner = view.leaders.get(pt)
                if owner is None or owner.node_id != preferred:
                    return False
        return all(
            cluster.nodes[cluster.nodes["a"].ck.view.map.replicas[pt][0]].ck.is_leader(pt)  # type: ignore[union-attr]
            for pt in range(P)
        )

    with trio.fail_after(120):
        while not settled():
            await trio.sleep(0.1)


async def test_a_leader_that_leaves_its_partitions_retries_a_failed_resign(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R=1: a leads everything, then b and c join and take partitions from it. a is no
    longer a replica of those, steps down and resigns; the first resigns fail."""
    async with open_test_cluster(partitions=P, replica_factor=1, rebalance_delay=0.5) as cluster:
        await cluster.start("a")
        await cluster.wait_converged()
        await wait_preferred_leaders(cluster)
        failing = FailingResigns(monkeypatch, count=3)
        await cluster.start("b")
        await cluster.start("c")
        await cluster.wait_converged()
        await wait_preferred_leaders(cluster)
        assert failing.failed == 3
        assert failing.calls > 3  # the failed ones were tried again


async def test_a_handover_to_the_preferred_replica_retries_a_failed_resign(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R=2: b and c lead everything while a is cut off; a comes back ready and asks for
    its partitions back; the leaders' resigns of that handover fail first."""
    async with open_test_cluster(
        partitions=P, replica_factor=3, session_ttl=2.0, rebalance_delay=30.0
    ) as cluster:
        a = await cluster.start("a")
        await cluster.start("b")
        await cluster.start("c")
        await cluster.wait_converged()
        await wait_preferred_leaders(cluster)
        led = {pt for pt in range(P) if a.ck.is_leader(pt)}
        assert led  # a is the preferred replica of some partitions
        a.cut()
        await trio.sleep(5.0)  # virtual: beyond the TTL; b and c take a's partitions
        with trio.fail_after(60):
            await cluster.nodes["b"].ck._views.wait_for(
                lambda v: all(
                    (o := v.leaders.get(pt)) is not None and o.node_id != "a" for pt in led
                )
            )
        failing = FailingResigns(monkeypatch, count=len(led))
        a.restore()
        await wait_preferred_leaders(cluster)
        assert failing.failed == len(led)
        assert failing.calls > len(led)
