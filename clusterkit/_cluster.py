"""The public facade: ``open_cluster`` and the :class:`ClusterKit` handle it yields.

``open_cluster`` owns the one nursery every actor of the node runs in. Start order is what
makes the handle trustworthy the moment it is yielded: the membership actor has registered
the node (or raised :class:`NodeIdConflict` / :class:`ClusterMismatch`), the watcher has
published a view read at one revision, and the rebalancer is campaigning.

Exception-group policy at the boundary (tested in ``tests/test_cluster_boundary.py``):

- the user's own exception from the ``async with`` body wins: it is re-raised as itself,
  never wrapped, and errors raised while leaving are logged, not raised over it;
- otherwise, when exactly one real error happened (an actor failed, e.g. NodeIdConflict at
  start or etcd refusing us for good), that error is raised as itself;
- several independent real errors are raised as an ``ExceptionGroup`` of them;
- ``trio.Cancelled`` passes through untouched, so outer cancel scopes work as usual.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import mmh3
import trio

from ._actors.cell import Latest
from ._actors.membership import Leave, MembershipActor, MembershipMessage, Session
from ._actors.rebalancer import RebalancerActor
from ._actors.watcher import WatcherActor
from ._config import Config
from ._core.keys import KeyLayout
from ._core.records import Node
from ._core.view import EMPTY_VIEW, ClusterView
from ._etcd.client import EtcdClient, open_etcd_client
from ._etcd.embedded import free_port, open_embedded_etcd

LEAVE_TIMEOUT = 5.0


class ClusterKit:
    """A running clusterkit node; get one from :func:`open_cluster`.

    Routing reads (``get_partition``, ``get_replicas``, ``get_nodes``, ...) never wait and
    never touch etcd: they read the newest :class:`ClusterView`. While etcd is unreachable
    they keep answering from the last view, and :meth:`is_healthy` is False.
    """

    def __init__(
        self,
        config: Config,
        etcd: EtcdClient,
        node: Node,
        views: Latest[ClusterView],
        session: Latest[Session | None],
        connected: Latest[bool],
        membership: trio.MemorySendChannel[MembershipMessage],
    ) -> None:
        self.config = config
        self.etcd = etcd
        self.node_id = config.node_id
        self._partitions = config.partitions
        self._node = node
        self._views = views
        self._session = session
        self._connected = connected
        self._membership = membership
        self._left = False
        self._actors: list[object] = []
        self._mmh3 = mmh3.hash
        self._mine_view: ClusterView | None = None
        self._mine: frozenset[int] = frozenset()

    def __repr__(self) -> str:
        v = self._views.value
        return (
            f"<ClusterKit {self.node_id} nodes={len(v.nodes)} "
            f"map_version={v.map.version if v.map else None} healthy={self.is_healthy()}>"
        )

    # -- routing (never awaits) ----------------------------------------------------------

    @property
    def node(self) -> Node:
        """This node's own record."""
        return self._node

    @property
    def view(self) -> ClusterView:
        """The newest immutable snapshot of the cluster."""
        return self._views.value

    def get_partition(self, key: str | bytes) -> int:
        """The partition of ``key``: ``mmh3(key) mod P`` (stable across processes/languages).

        A ``str`` is hashed as its UTF-8 bytes; the same as
        ``clusterkit._core.hashing.partition_for`` (inlined here: this is the hot path).
        """
        return self._mmh3(key, 0, False) % self._partitions

    def get_replicas(self, partition: int) -> list[Node]:
        """The replicas of ``partition``, preferred leader first (empty before the first map).

        Raises:
            ValueError: ``partition`` is not in ``range(P)``.
        """
        if not 0 <= partition < self._partitions:
            raise ValueError(f"partition {partition} is not in range({self._partitions})")
        rows = self._views.value.replica_nodes
        return list(rows[partition]) if rows else []

    def is_replica(self, partition: int) -> bool:
        """True when this node is one of ``partition``'s replicas in the current map."""
        view = self._views.value
        if view is not self._mine_view:
            me = self.node_id
            self._mine = frozenset(
                pt for pt, row in enumerate(view.replica_nodes) if any(n.id == me for n in row)
            )
            self._mine_view = view
        if not 0 <= partition < self._partitions:
            raise ValueError(f"partition {partition} is not in range({self._partitions})")
        return partition in self._mine

    def get_nodes(self) -> list[Node]:
        """The registered (alive) nodes, sorted by id."""
        nodes = self._views.value.nodes
        return [nodes[k] for k in sorted(nodes)]

    def get_partition_map(self) -> dict[int, list[Node]]:
        """Every partition's replicas, preferred leader first."""
        rows = self._views.value.replica_nodes
        return {pt: list(row) for pt, row in enumerate(rows)}

    def is_healthy(self) -> bool:
        """True while this node has a live session and its watch on etcd is connected."""
        session = self._session.value
        return (
            not self._left
            and session is not None
            and trio.current_time() < session.deadline
            and self._connected.value
        )

    async def wait_converged(self, members: Iterable[str] | None = None) -> ClusterView:
        """Wait until the stored map covers exactly the current active members.

        Args:
            members: also wait until the active members are exactly these node ids.

        Returns:
            The first view that satisfies the condition.

        Bound the wait with a cancel scope (``trio.fail_after``).
        """
        r = self.config.replica_factor
        want = frozenset(members) if members is not None else None
        return await self._views.wait_for(
            lambda v: v.converged(r) and (want is None or v.active_node_ids() == want)
        )

    def statistics(self) -> dict[str, dict[str, int]]:
        """Counters of every actor, by actor."""
        return {
            type(a).__name__: a.statistics()  # type: ignore[attr-defined]
            for a in self._actors
        }

    # -- leaving -------------------------------------------------------------------------

    async def leave(self) -> None:
        """Leave the cluster now: revoke the session so the others see it at once.

        Idempotent. Errors are logged, not raised; bounded by a few seconds.
        """
        if self._left:
            return
        self._left = True
        done = trio.Event()
        with trio.move_on_after(LEAVE_TIMEOUT) as scope:
            try:
                await self._membership.send(Leave(done))
                await done.wait()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if scope.cancelled_caught:
            self.config.log.warning("clusterkit %s: leave did not finish in time", self.node_id)


def _flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _flatten(sub)]
    return [exc]


@asynccontextmanager
async def _etcd_endpoints(config: Config) -> AsyncIterator[tuple[str, ...]]:
    if config.etcd_endpoints:
        yield tuple(config.etcd_endpoints)
        return
    async with open_embedded_etcd(
        binary=config.embedded_etcd_binary, data_dir=config.embedded_etcd_dir
    ) as etcd:
        yield etcd.endpoints


def _node_record(config: Config) -> Node:
    host = config.advertise_addr
    http = config.http_port or free_port("127.0.0.1")
    return Node(
        id=config.node_id,
        addr=host,
        endpoints={"http": f"{host}:{http}", "grpc": f"{host}:{config.grpc_port}"},
        metadata=dict(config.metadata),
        started=time.time(),
    )


@asynccontextmanager
async def open_cluster(config: Config) -> AsyncIterator[ClusterKit]:
    """Join the cluster for the duration of the ``async with`` block.

    With no ``etcd_endpoints`` an embedded etcd is started for this node and stopped on exit.
    Leaving the block (normally, by an exception or by cancellation) revokes the node's
    session so the other nodes see it leave at once.

    Yields:
        The :class:`ClusterKit` handle, once the node is registered and has a view.

    Raises:
        ConfigError: ``config`` is invalid (raised by :class:`Config` itself).
        NodeIdConflict: another live node has this node id.
        ClusterMismatch: the stored cluster has another P or R.
        EtcdUnavailable: etcd did not answer within ``etcd_dial_timeout``.
    """
    if not isinstance(config, Config):
        raise TypeError(f"open_cluster expects a clusterkit.Config, got {type(config).__name__}")
    user_error: BaseException | None = None
    try:
        async with (
            _etcd_endpoints(config) as endpoints,
            open_etcd_client(config.etcd_config(endpoints)) as etcd,
        ):
            layout = KeyLayout(config.etcd_prefix)
            node = _node_record(config)
            views: Latest[ClusterView] = Latest(EMPTY_VIEW, "view")
            session: Latest[Session | None] = Latest(None, "session")
            connected: Latest[bool] = Latest(False, "connected")
            send, receive = trio.open_memory_channel[MembershipMessage](1)
            membership = MembershipActor(etcd, config, layout, node, session, receive)
            watcher = WatcherActor(etcd, config, layout, views, connected)
            rebalancer = RebalancerActor(etcd, config, layout, node.id, session, views)
            async with trio.open_nursery() as nursery:
                await nursery.start(membership.run)
                await nursery.start(watcher.run)
                await nursery.start(rebalancer.run)
                ck = ClusterKit(config, etcd, membership.node, views, session, connected, send)
                ck._actors = [membership, watcher, rebalancer]
                try:
                    yield ck
                except BaseException as exc:
                    user_error = exc
                    raise
                finally:
                    ck._left = True
                    nursery.cancel_scope.cancel()
                    with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_TIMEOUT):
                        await membership.close()
    except BaseException as group:
        leaves = _flatten(group)
        if user_error is not None and any(leaf is user_error for leaf in leaves):
            for leaf in leaves:
                if leaf is not user_error and not isinstance(leaf, trio.Cancelled):
                    config.log.error("clusterkit %s: while leaving: %r", config.node_id, leaf)
            raise user_error from None
        real = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
        if len(real) == 1 and isinstance(group, BaseExceptionGroup):
            raise real[0] from None
        raise
