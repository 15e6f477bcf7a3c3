"""The public facade: ``open_cluster`` and the :class:`ClusterKit` handle it yields.

``open_cluster`` owns the one nursery every actor of the node runs in. Start order is what
makes the handle trustworthy the moment it is yielded: the membership actor has registered
the node (or raised :class:`NodeIdConflict` / :class:`ClusterMismatch`), the watcher has
published a view read at one revision, and the rebalancer is campaigning.

Exceptions at the boundary follow ``_boundary.py``: the user's own exception wins, a single
real error (an actor failed, e.g. NodeIdConflict at start) is raised as itself.
"""

from __future__ import annotations

import inspect
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

import mmh3
import trio

from ._actors.batcher import EtcdBatcher
from ._actors.cell import Latest
from ._actors.drain import DrainWatcher
from ._actors.events import EventHub, EventStream
from ._actors.liveness import LivenessProbe
from ._actors.membership import Drain, Leave, MembershipActor, MembershipMessage, Session
from ._actors.partitions import (
    LOST_HOOK_TIMEOUT,
    Leadership,
    PartitionContext,
    PartitionSupervisor,
)
from ._actors.rebalancer import RebalancerActor
from ._actors.watcher import WatcherActor
from ._boundary import reraise
from ._config import ENV_ETCD_ENDPOINTS, Config
from ._core.hashing import partition_for
from ._core.keys import KeyLayout
from ._core.records import Node
from ._core.view import EMPTY_VIEW, ClusterView
from ._errors import ClusterKitError, LeadershipLost, NotLeader
from ._etcd.client import EtcdClient, open_etcd_client
from ._etcd.embedded import open_embedded_etcd
from ._grpc.channel import GrpcPool, TrioChannel
from ._grpc.health import add_health_service
from ._grpc.server import GrpcServer
from ._grpc.tls import channel_tls_credentials, server_tls_credentials
from ._metrics import health_routes, render_for, serve_metrics
from ._migration.grpc_transport import add_migration_service
from ._migration.service import Migration
from ._peers.keyring import Keyring
from ._peers.memory import MemoryNetwork
from ._peers.secret import SecretKeeper, configured_secret, shared_secret
from ._peers.service import Peers
from ._peers.session import Handler, StreamHandler
from ._peers.tls import client_context, server_context
from ._peers.transport import PeerPool, serve_memory_peers, serve_peers

LEAVE_TIMEOUT = 5.0
# Stopping the partitions waits for every leader's on_leader_lost (each bounded by
# LOST_HOOK_TIMEOUT, all of them by LOST_HOOK_TIMEOUT + 1): the session must not be revoked
# (letting a successor win) before those hooks ran, so this bound is longer than theirs.
STOP_PARTITIONS_TIMEOUT = LOST_HOOK_TIMEOUT + 2.0


def leader_margin(session_ttl: float) -> float:
    """How long before the local lease deadline a leader steps down (self-fencing).

    The local deadline is already early (it counts from when the keepalive was *sent*); the
    margin absorbs clock-rate differences and scheduling delay: a tenth of the TTL, at most
    half a second.
    """
    return min(0.5, session_ttl / 10)


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
        leadership: Leadership,
        events: EventHub,
        margin: float,
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
        self._mine_rows: tuple[tuple[Node, ...], ...] | None = None
        self._mine: frozenset[int] = frozenset()
        self._leadership = leadership
        self._events = events
        self._margin = margin
        self._supervisor: PartitionSupervisor | None = None
        self.peers: Peers
        """Talk to other nodes (requests, one-way messages, streams); see :class:`Peers`."""
        self.migration: Migration
        """Move partitions between nodes (source, pull); see :class:`Migration`."""
        self.metrics_address: str | None = None
        """``host:port`` of the Prometheus endpoint (``/metrics``), or None when disabled."""
        self.grpc_server: GrpcServer | None = None
        """The node's gRPC server (None with ``grpc_server=False``): :meth:`add_grpc_service`."""
        self.grpc_pool: GrpcPool | None = None
        """gRPC channels to the nodes (the Go README's ``GRPCPool``); see :meth:`grpc_channel`."""

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
    def etcd_endpoints(self) -> tuple[str, ...]:
        """The etcd endpoints this node uses: the config's, ``$CLUSTERKIT_ETCD_ENDPOINTS``,
        or its embedded etcd's (give these to other nodes so they join this cluster)."""
        return tuple(self.etcd.config.endpoints)

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
        rows = self._views.value.replica_nodes
        if rows is not self._mine_rows:
            me = self.node_id
            self._mine = frozenset(
                pt for pt, row in enumerate(rows) if any(n.id == me for n in row)
            )
            self._mine_rows = rows
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

    # -- gRPC ----------------------------------------------------------------------------

    def add_grpc_service(
        self, add_to_server: Callable[[Any, Any], None], servicer: Any
    ) -> list[str]:
        """Serve an app's gRPC service on this node's gRPC port, with Trio handlers.

        ``ck.add_grpc_service(my_pb2_grpc.add_KVServicer_to_server, KV(ck))``: the servicer's
        methods are Trio ``async def M(self, request, context)`` (a streaming response: an
        async generator that yields the responses; a streaming request: an async iterator).
        Calls need the cluster secret (``ck.grpc_channel`` adds it); ``context.abort(code,
        details)`` ends a call with a status. Handlers run in the node's nursery: they are
        cancelled when the caller goes away or the node stops.

        Returns:
            The full method names added.

        Raises:
            ClusterKitError: this node serves no gRPC (``grpc_server=False``).
            ValueError: a method is already served.
        """
        if self.grpc_server is None:
            raise ClusterKitError("this node serves no gRPC (grpc_server=False)")
        return self.grpc_server.add_service(add_to_server, servicer)

    def grpc_channel(self, node: Node | str) -> TrioChannel:
        """A channel to ``node``'s gRPC server whose stubs are Trio calls.

        ``stub = my_pb2_grpc.KVStub(ck.grpc_channel(ck.get_leader(pt)))``, then
        ``await stub.Get(request, timeout=2)``. ``node``: a :class:`Node`, a node id, or
        ``"host:port"``. One channel per address, kept for the node's life; every call
        carries the cluster secret's credentials.

        Raises:
            ClusterKitError: this node has no gRPC layer (``grpc_server=False``).
            PeerUnreachable: the node is unknown or advertises no gRPC address.
        """
        if self.grpc_pool is None:
            raise ClusterKitError("this node has no gRPC layer (grpc_server=False)")
        return self.grpc_pool.get(node)

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

    # -- leaders -------------------------------------------------------------------------

    def get_leader(self, partition: int) -> Node | None:
        """The node holding ``partition``'s leader key in the current view (None: no leader).

        Another node's leadership is as fresh as this node's view; to act *as* the leader,
        use :meth:`is_leader` / :meth:`leadership`, which fence on this node's own lease.
        """
        if partition in self._leadership.epochs and self.is_leader(partition):
            return self._node
        owner = self._views.value.leaders.get(partition)
        if owner is None:
            return None
        view = self._views.value
        return view.nodes.get(owner.node_id) or Node(owner.node_id, "", state="gone")

    def leader_epoch(self, partition: int) -> int | None:
        """The fencing epoch of ``partition``'s current leader: its key's create_revision.

        Strictly increasing per partition; stamp writes with it so replicas can refuse a
        stale leader. None while the partition has no leader. On the node that
        :meth:`is_leader`, always the epoch it leads under (even before its view shows the key).
        """
        epoch = self._leadership.epochs.get(partition)
        if epoch is not None and self.is_leader(partition):
            return epoch  # our own, even before the view shows our key
        owner = self._views.value.leaders.get(partition)
        return owner.create_revision if owner is not None else None

    def is_leader(self, partition: int) -> bool:
        """True only while this node leads ``partition`` and is sure its lease is alive.

        Compares the clock with the session's local deadline (minus a margin) on every call,
        so a node waking from a long pause never answers True from stale state.
        """
        if partition not in self._leadership.epochs:
            return False
        session = self._session.value
        return (
            session is not None
            and session.generation == self._leadership.generations.get(partition)
            and trio.current_time() < session.deadline - self._margin
        )

    @asynccontextmanager
    async def leadership(self, partition: int) -> AsyncIterator[int]:
        """Run leader work inside a cancel scope that ends with the leadership.

        Yields:
            The fencing epoch.

        Raises:
            NotLeader: this node does not lead ``partition`` now.
            LeadershipLost: leadership ended during the block, which was cancelled.
        """
        if not self.is_leader(partition):
            raise NotLeader(f"{self.node_id} does not lead partition {partition}")
        epoch = self._leadership.epochs[partition]
        session = self._session.value
        assert session is not None
        with trio.CancelScope(deadline=session.deadline - self._margin) as scope:
            self._leadership.scopes.setdefault(partition, set()).add(scope)
            try:
                yield epoch
            finally:
                self._leadership.scopes.get(partition, set()).discard(scope)
        if scope.cancelled_caught:
            raise LeadershipLost(f"{self.node_id} lost partition {partition} (epoch {epoch})")

    def events(self) -> EventStream:
        """Subscribe to this node's events (the same stream the hooks see).

        Use ``async with ck.events() as stream: async for ev in stream: ...``; a plain
        ``async for ev in ck.events()`` works too. A subscriber more than 10,000 events
        behind is dropped with :class:`EventStreamOverflow`.
        """
        return self._events.subscribe()

    # -- leaving -------------------------------------------------------------------------

    async def leave(self, *, drain: bool = False) -> None:
        """Leave the cluster: revoke the session so the others see it at once.

        Args:
            drain: first hand every partition off (two-phase: the new replicas pull the data
                and become ready) and only then leave. Bound it with ``trio.fail_after``.

        Idempotent. Errors are logged, not raised; the final revoke is bounded by a few
        seconds.
        """
        if self._left:
            return
        if drain:
            done = trio.Event()
            try:
                await self._membership.send(Drain(done))
                await done.wait()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.config.log.warning("clusterkit %s: drain: membership stopped", self.node_id)
            me = self.node_id
            # Done when nothing maps to this node any more — or when nobody is left to take
            # over (the last node, or every node draining): then there is nothing to move.
            await self._views.wait_for(
                lambda v: (
                    v.map is None or me not in v.map.node_ids() or not (v.active_node_ids() - {me})
                )
            )
            if self._supervisor is not None:  # the last on_partition_unassigned hooks ran
                await self._supervisor.active.wait_for(lambda n: n == 0)
        self._left = True
        done = trio.Event()
        if self._supervisor is not None:
            # Leaders hear on_leader_lost before the revoke lets a successor win.
            with trio.move_on_after(STOP_PARTITIONS_TIMEOUT):
                await self._supervisor.stop()
        with trio.move_on_after(LEAVE_TIMEOUT) as scope:
            try:
                await self._membership.send(Leave(done))
                await done.wait()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if scope.cancelled_caught:
            self.config.log.warning("clusterkit %s: leave did not finish in time", self.node_id)


@asynccontextmanager
async def _etcd_endpoints(config: Config) -> AsyncIterator[tuple[str, ...]]:
    """The etcd endpoints to use: the config's (``$CLUSTERKIT_ETCD_ENDPOINTS`` is read into
    it by :class:`Config`), else those of an embedded etcd started for the block.

    The embedded etcd serves clients on ``embedded_etcd_bind``; a wildcard bind is advertised
    as ``advertise_addr``. Starting one is logged once, with the endpoint other nodes must be
    given: without it, every node started without endpoints is a cluster of its own.
    """
    if config.etcd_endpoints:
        yield tuple(config.etcd_endpoints)
        return
    host, port = config.embedded_etcd_address()
    wildcard = host in ("0.0.0.0", "::")
    dialed = config.advertise_addr if wildcard else host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    async with open_embedded_etcd(
        binary=config.embedded_etcd_binary,
        data_dir=config.embedded_etcd_dir,
        client_host=f"[{dialed}]" if ":" in dialed else dialed,  # IPv6 in brackets
        client_listen=f"[{host}]" if ":" in host else host,
        client_port=port,
    ) as etcd:
        endpoint = ",".join(etcd.endpoints)
        reach = (
            "loopback: this machine only; set embedded_etcd_bind to serve other machines"
            if loopback
            else f"served on {config.embedded_etcd_bind}"
        )
        config.log.warning(
            "clusterkit %s: no etcd_endpoints and no $%s: started an embedded etcd at %s "
            "(%s). Other nodes join this cluster only with CLUSTERKIT_ETCD_ENDPOINTS=%s (or "
            "etcd_endpoints); else each is a cluster of its own",
            config.node_id,
            ENV_ETCD_ENDPOINTS,
            endpoint,
            reach,
            endpoint,
        )
        yield etcd.endpoints


def _node_record(config: Config, peer: str, grpc_port: int) -> Node:
    host = config.advertise_addr
    endpoints = {"peer": peer}
    if grpc_port:
        endpoints["grpc"] = f"{host}:{grpc_port}"
    if config.http_port:
        endpoints["http"] = f"{host}:{config.http_port}"
    return Node(
        id=config.node_id,
        addr=host,
        endpoints=endpoints,
        metadata=dict(config.metadata),
        started=time.time(),
    )


Setup = Callable[["ClusterKit"], Awaitable[None] | None]


@asynccontextmanager
async def open_cluster(config: Config, *, setup: Setup | None = None) -> AsyncIterator[ClusterKit]:
    """Join the cluster for the duration of the ``async with`` block.

    ``setup(ck)`` (sync or async), if given, runs with the handle before any hook and before
    the block: register peer handlers, the migration source and sink and gRPC services there,
    and a hook never finds them missing (``async with open_cluster(cfg, setup=app.attach)``).
    If it raises, the node leaves and the error is raised here.

    etcd is reached at ``config.etcd_endpoints`` (which :class:`Config` fills from
    ``$CLUSTERKIT_ETCD_ENDPOINTS`` when the config names none). With neither, an embedded etcd
    is started for this node (serving clients on ``embedded_etcd_bind``) and stopped on exit;
    its endpoint is logged once (a warning: until other nodes are given it, this node is a
    cluster of one) and is ``ck.etcd_endpoints``.
    Leaving the block (normally, by an exception or by cancellation) revokes the node's
    session so the other nodes see it leave at once.

    Yields:
        The :class:`ClusterKit` handle, once the node is registered and has a view.

    Raises:
        ConfigError: ``config`` is invalid (raised by :class:`Config` itself).
        NodeIdConflict: another live node has this node id.
        ClusterMismatch: the cluster stored under the prefix (``P/cluster``) has another P,
            R, hash function or map format, or that record is unreadable; raised before
            this node registers.
        EtcdUnavailable: etcd did not answer within ``etcd_dial_timeout``.
    """
    if not isinstance(config, Config):
        raise TypeError(f"open_cluster expects a clusterkit.Config, got {type(config).__name__}")
    async with _open_node(config, _real_etcd(config), setup=setup) as ck:
        yield ck


@asynccontextmanager
async def _real_etcd(config: Config) -> AsyncIterator[EtcdClient]:
    async with (
        _etcd_endpoints(config) as endpoints,
        open_etcd_client(config.etcd_config(endpoints)) as etcd,
    ):
        yield etcd


async def _start_peers(
    nursery: trio.Nursery,
    config: Config,
    etcd: EtcdClient,
    layout: KeyLayout,
    views: Latest[ClusterView],
    network: MemoryNetwork | None = None,
) -> Peers:
    """Serve this node's peer endpoint (bound before the node registers its address) and
    set up the outgoing connection pool."""
    secret: bytes | Keyring
    if config.resolved_secret is not None:
        secret = configured_secret(config.resolved_secret)
    else:
        # A missing secret while nodes are registered is restored by their keepers: wait for
        # that rather than split the cluster with a new one (secret.py).
        secret = await shared_secret(
            etcd, layout, create=True, wait_for_restore=2 * config.session_ttl
        )
        await nursery.start(SecretKeeper(etcd, layout, secret, config.log).run)
    handlers: dict[str, Handler] = {}
    stream_handlers: dict[str, StreamHandler] = {}
    server_tls = client_tls = None
    if config.peer_tls_cert is not None and config.peer_tls_key is not None:
        server_tls = server_context(config.peer_tls_cert, config.peer_tls_key)
    if config.peer_tls_ca is not None:
        client_tls = client_context(config.peer_tls_ca, config.peer_tls_cert, config.peer_tls_key)
    if network is not None:  # clusterkit.testing: an in-process network, no sockets
        address: str = await nursery.start(
            partial(
                serve_memory_peers,
                network,
                config.node_id,
                secret,
                handlers,
                stream_handlers=stream_handlers,
                max_frame=config.peer_max_message,
            )
        )
    else:
        port: int = await nursery.start(
            partial(
                serve_peers,
                config.node_id,
                secret,
                handlers,
                config.bind_addr or config.advertise_addr,
                config.peer_port,
                stream_handlers=stream_handlers,
                max_frame=config.peer_max_message,
                ssl_context=server_tls,
                max_pending=config.peer_max_pending_handshakes,
            )
        )
        address = f"{config.advertise_addr}:{port}"
    pool = PeerPool(
        nursery,
        config.node_id,
        secret,
        handlers,
        stream_handlers,
        max_frame=config.peer_max_message,
        ssl_context=client_tls,
        network=network,
    )
    return Peers(
        pool,
        lambda node_id: views.value.nodes.get(node_id),
        address=address,
        timeout=config.peer_timeout,
        handlers=handlers,
        stream_handlers=stream_handlers,
    )


def _grpc_layer(
    config: Config, peers: Peers, views: Latest[ClusterView]
) -> tuple[GrpcServer, GrpcPool]:
    """The node's gRPC server and its pool of channels, on one loop thread."""
    server_credentials = channel_credentials = None
    if config.peer_tls_cert is not None and config.peer_tls_key is not None:
        # As the peer endpoint: TLS authenticates the server; the secret, every caller.
        server_credentials = server_tls_credentials(config.peer_tls_cert, config.peer_tls_key, None)
    if config.peer_tls_ca is not None:
        channel_credentials = channel_tls_credentials(
            config.peer_tls_ca, config.peer_tls_cert, config.peer_tls_key
        )
    server = GrpcServer(
        node_id=config.node_id,
        host=config.bind_addr or config.advertise_addr,
        port=config.grpc_port,
        secret=peers.secret,
        credentials=server_credentials,
        max_message=config.grpc_max_message,
        max_calls=config.grpc_max_calls,
        log=config.log,
    )
    pool = GrpcPool(
        server.bridge,
        caller=config.node_id,
        secret=lambda: peers.secret,
        resolve=lambda node: views.value.nodes.get(node) if isinstance(node, str) else node,
        credentials=channel_credentials,
        max_message=config.grpc_max_message,
    )
    server.pools.append(pool)
    return server, pool


@asynccontextmanager
async def _open_node(
    config: Config,
    etcd_cm: AbstractAsyncContextManager[EtcdClient],
    *,
    network: MemoryNetwork | None = None,
    setup: Setup | None = None,
) -> AsyncIterator[ClusterKit]:
    """``open_cluster`` on a given etcd client (``clusterkit.testing`` passes an in-memory one,
    and an in-process network for the peers)."""
    user_error: BaseException | None = None
    try:
        async with etcd_cm as etcd:
            layout = KeyLayout(config.etcd_prefix)
            views: Latest[ClusterView] = Latest(EMPTY_VIEW, "view")
            session: Latest[Session | None] = Latest(None, "session")
            connected: Latest[bool] = Latest(False, "connected")
            send, receive = trio.open_memory_channel[MembershipMessage](1)
            watcher = WatcherActor(etcd, config, layout, views, connected)
            rebalancer = RebalancerActor(etcd, config, layout, config.node_id, session, views)
            hub = EventHub()
            leaders = Leadership()
            margin = leader_margin(config.session_ttl)
            async with trio.open_nursery() as nursery:
                peers = await _start_peers(nursery, config, etcd, layout, views, network)
                migration = Migration(
                    peers,
                    node_id=config.node_id,
                    partitions=config.partitions,
                    max_frame=config.peer_max_message,
                    log=config.log,
                    partition_of=partial(partition_for, partitions=config.partitions),
                )
                grpc_port = config.grpc_port
                grpc_server = grpc_pool = None
                healthy: list[Callable[[], bool]] = [lambda: False]
                if config.grpc_server and network is None:
                    grpc_server, grpc_pool = _grpc_layer(config, peers, views)
                    add_migration_service(grpc_server._add, migration)
                    add_health_service(grpc_server, lambda: healthy[0]())
                    migration.grpc = grpc_pool
                    migration.grpc_max_wire = config.grpc_max_message - 1024
                    grpc_port = await nursery.start(grpc_server.run)
                node = _node_record(config, peers.address, grpc_port)
                membership = MembershipActor(etcd, config, layout, node, session, receive)
                liveness = LivenessProbe()
                await nursery.start(liveness.run)
                await nursery.start(membership.run)
                await nursery.start(watcher.run)
                await nursery.start(membership.guard_registration, views)
                partitions = PartitionSupervisor(
                    PartitionContext(
                        config=config,
                        batcher=EtcdBatcher(etcd),
                        layout=layout,
                        node_id=config.node_id,
                        session=session,
                        leadership=leaders,
                        limiter=trio.CapacityLimiter(config.hook_concurrency),
                        emit=hub.emit,
                        margin=margin,
                        # A map older than this first view was written before this process
                        # joined: its roles belong to an earlier incarnation (partitions.py).
                        start_revision=views.value.revision,
                    ),
                    views,
                    watcher.take_changes,
                )
                await nursery.start(rebalancer.run)
                await nursery.start(partitions.run)
                ck = ClusterKit(
                    config,
                    etcd,
                    membership.node,
                    views,
                    session,
                    connected,
                    send,
                    leaders,
                    hub,
                    margin,
                )
                ck.peers = peers
                ck.migration = migration
                ck.grpc_server, ck.grpc_pool = grpc_server, grpc_pool
                healthy[0] = ck.is_healthy
                migration._epoch_of = ck.leader_epoch
                ck._actors = [membership, watcher, rebalancer, partitions, liveness]
                ck._supervisor = partitions
                if config.metrics_port is not None:
                    host = config.bind_addr or config.advertise_addr
                    port: int = await nursery.start(
                        serve_metrics, health_routes(ck, render_for(ck)), host, config.metrics_port
                    )
                    ck.metrics_address = f"{config.advertise_addr}:{port}"
                drain_watcher = DrainWatcher(
                    etcd, layout, config.node_id, lambda: ck.leave(drain=True), config.log
                )
                ck._actors.append(drain_watcher)
                if setup is not None:
                    prepared = setup(ck)
                    if inspect.isawaitable(prepared):
                        await prepared
                partitions.open()  # hooks run from here on: setup and the body came first
                nursery.start_soon(drain_watcher.run)
                current = views.value
                config.log.info(
                    "clusterkit %s: joined: peers at %s, http %s, grpc %s, etcd %s, "
                    "map version %s, %d node(s)",
                    config.node_id,
                    membership.node.peer_addr(),
                    membership.node.http_addr() or "none",
                    membership.node.grpc_addr(),
                    ",".join(etcd.config.endpoints),
                    current.map.version if current.map is not None else "none yet",
                    len(current.nodes),
                )
                try:
                    yield ck
                except BaseException as exc:
                    user_error = exc
                    raise
                finally:
                    ck._left = True
                    with trio.CancelScope(shield=True):
                        # Leaders hear on_leader_lost before the session (and with it every
                        # leader key) is revoked; then the rest stops.
                        with trio.move_on_after(STOP_PARTITIONS_TIMEOUT):
                            await partitions.stop()
                        hub.close()
                        await peers.aclose()
                        nursery.cancel_scope.cancel()
                        with trio.move_on_after(LEAVE_TIMEOUT):
                            await membership.close()
    except BaseException as group:
        reraise(
            group,
            user_error,
            lambda leaf: config.log.error("clusterkit %s: while leaving: %r", config.node_id, leaf),
        )
