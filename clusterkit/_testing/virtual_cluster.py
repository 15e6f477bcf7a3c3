"""Several clusterkit nodes in one Trio program, on the in-memory etcd, with fault knobs.

Every node is a real ``open_cluster`` (the same actors, the same code paths) whose etcd
client is a :class:`MemoryEtcdClient` of one shared :class:`MemoryEtcd`. Under
``trio.testing.MockClock(autojump_threshold=0)`` session TTLs, rebalance delays and hook
backoffs cost no wall-clock time, so a test can run hundreds of faults in seconds.

Faults:

- :meth:`TestNode.cut` / :meth:`TestNode.restore`: the node cannot reach etcd (a partition
  between it and etcd). It keeps running: its leases expire in etcd, it self-fences, and it
  rejoins after ``restore``.
- :meth:`TestCluster.kill`: a crash. The node is cut off first and then stopped, so nothing
  is revoked: the others notice when its lease expires, as with a real crash.
- :meth:`TestCluster.stop`: a graceful leave (``drain=True`` to hand everything off first).
- ``cluster.store.compact(...)``, ``cluster.store.fail(...)`` / ``heal()``: etcd-side faults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import trio

from .._cluster import ClusterKit, _open_node
from .._config import Config
from .._etcd.client import EtcdClient
from .._peers.memory import MemoryNetwork
from .memory_client import MemoryEtcdClient
from .memory_etcd import open_memory_etcd
from .memory_store import MemoryEtcd


@dataclass
class TestNode:
    """One node of a :class:`TestCluster`."""

    __test__ = False  # not a pytest test class

    node_id: str
    ck: ClusterKit
    client: MemoryEtcdClient
    scope: trio.CancelScope
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None

    def cut(self) -> None:
        """Cut this node off from etcd (its requests fail, its watches end)."""
        self.client.cut()

    def restore(self) -> None:
        """Let this node reach etcd again."""
        self.client.restore()


class TestCluster:
    """Starts, stops, kills and cuts nodes; see :func:`open_test_cluster`."""

    __test__ = False

    def __init__(self, store: MemoryEtcd, nursery: trio.Nursery, defaults: dict[str, Any]):
        self.store = store
        self.network = MemoryNetwork()  # the nodes' peer connections: in process, no sockets
        self._nursery = nursery
        self._defaults = defaults
        self.nodes: dict[str, TestNode] = {}

    def config(self, node_id: str, **overrides: Any) -> Config:
        """The config a node of this cluster gets (defaults + ``overrides``)."""
        settings = {**self._defaults, **overrides, "node_id": node_id}
        settings.setdefault("etcd_endpoints", ["memory:1"])
        return Config(**settings)

    async def start(
        self,
        node_id: str,
        *,
        setup: Callable[[ClusterKit], Awaitable[None] | None] | None = None,
        **overrides: Any,
    ) -> TestNode:
        """Start a node; returns once it is registered and has a view.

        ``setup`` is ``open_cluster``'s: it runs with the handle before any hook.

        Raises:
            ClusterKitError: the node failed to start (e.g. NodeIdConflict).
        """
        config = self.config(node_id, **overrides)
        client = self.store.client(request_timeout=config.etcd_request_timeout)

        @asynccontextmanager
        async def etcd() -> AsyncIterator[EtcdClient]:
            try:
                yield cast(EtcdClient, client)
            finally:
                await client.aclose()

        async def run(task_status: trio.TaskStatus[TestNode]) -> None:
            node: TestNode | None = None
            try:
                with trio.CancelScope() as scope:
                    async with _open_node(config, etcd(), network=self.network, setup=setup) as ck:
                        node = TestNode(node_id, ck, client, scope)
                        self.nodes[node_id] = node
                        task_status.started(node)
                        await trio.sleep_forever()
            except Exception as exc:
                if node is None:
                    raise
                node.error = exc  # recorded for the test to inspect
            finally:
                if node is not None:
                    node.done.set()
                    if self.nodes.get(node_id) is node:
                        del self.nodes[node_id]

        started: TestNode = await self._nursery.start(run)
        return started

    async def stop(self, node_id: str, *, drain: bool = False) -> None:
        """Leave gracefully (revoking the session; with ``drain``, hand off first)."""
        node = self.nodes[node_id]
        if drain:
            await node.ck.leave(drain=True)
        node.scope.cancel()
        await node.done.wait()

    async def kill(self, node_id: str) -> None:
        """Crash the node: it vanishes without revoking anything."""
        node = self.nodes[node_id]
        node.cut()
        node.scope.cancel()
        await node.done.wait()

    async def wait_converged(self) -> None:
        """Until every running node sees the same converged map covering exactly them."""
        members = set(self.nodes)
        for node in list(self.nodes.values()):
            await node.ck.wait_converged(members)
        newest = max(n.ck.view.map.version for n in self.nodes.values() if n.ck.view.map)
        for node in list(self.nodes.values()):
            await node.ck._views.wait_for(lambda v: v.map is not None and v.map.version >= newest)
            await node.ck.wait_converged(members)


@asynccontextmanager
async def open_test_cluster(**defaults: Any) -> AsyncIterator[TestCluster]:
    """Run a virtual-time test cluster; nodes are added with ``await cluster.start(id)``.

    Args:
        defaults: Config fields every node gets (e.g. ``partitions=16, session_ttl=5``).
            ``http_port`` defaults to 0 and ``metrics_port`` to None.
    """
    defaults.setdefault("http_port", 0)
    defaults.setdefault("metrics_port", None)
    async with open_memory_etcd() as store, trio.open_nursery() as nursery:
        cluster = TestCluster(store, nursery, defaults)
        try:
            yield cluster
        finally:
            nursery.cancel_scope.cancel()
