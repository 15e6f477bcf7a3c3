"""Helpers to run several clusterkit nodes in one Trio program (tests only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

import clusterkit


@dataclass
class RunningNode:
    """A node started by :func:`start_node`; ``stop()`` leaves gracefully."""

    ck: clusterkit.ClusterKit
    scope: trio.CancelScope
    done: trio.Event

    async def stop(self) -> None:
        self.scope.cancel()
        with trio.fail_after(10):
            await self.done.wait()


def node_config(
    node_id: str, endpoints: Sequence[str], prefix: str, **overrides: Any
) -> clusterkit.Config:
    settings: dict[str, Any] = {
        "node_id": node_id,
        "etcd_endpoints": list(endpoints),
        "etcd_prefix": prefix.rstrip("/"),
        "http_port": 0,
        "partitions": 64,
        "replica_factor": 3,
        "session_ttl": 2.0,
        "rebalance_delay": 0.2,
        "metrics_port": None,
        "grpc_port": 0,
    }
    settings.update(overrides)
    return clusterkit.Config(**settings)


async def start_node(nursery: trio.Nursery, config: clusterkit.Config) -> RunningNode:
    """Start a node in ``nursery``; returns once it is registered and has a view."""

    async def run(task_status: trio.TaskStatus[RunningNode]) -> None:
        done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with clusterkit.open_cluster(config) as ck:
                    task_status.started(RunningNode(ck, scope, done))
                    await trio.sleep_forever()
        finally:
            done.set()

    node: RunningNode = await nursery.start(run)
    return node


async def wait_converged(nodes: Sequence[RunningNode], timeout: float = 15.0) -> int:
    """Wait until every node sees the same converged map covering exactly ``nodes``.

    A node whose watch lags may still hold an older map that happens to cover the same
    members, so this also waits until all nodes agree on the newest map version.
    """
    want = {n.ck.node_id for n in nodes}
    with trio.fail_after(timeout):
        for n in nodes:
            await n.ck.wait_converged(want)
        newest = max(n.ck.view.map.version for n in nodes if n.ck.view.map is not None)
        for n in nodes:
            await n.ck._views.wait_for(lambda v: v.map is not None and v.map.version >= newest)
            await n.ck.wait_converged(want)
    versions = {n.ck.view.map.version for n in nodes if n.ck.view.map is not None}
    assert len(versions) == 1, versions
    return versions.pop()
