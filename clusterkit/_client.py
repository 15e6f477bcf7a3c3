"""The routing client: ``open_client`` and the :class:`RoutingClient` it yields.

A routing client is a process that is not a member of the cluster but sends work to it:
it reads the cluster from etcd and calls the leader of a key's partition over the peer
transport, as a node would (same hash, same view, same secret handshake).

Theory of operation
-------------------
The view. With ``cache_enabled`` (the default) a :class:`WatcherActor` mirrors the prefix
into :class:`ClusterView` snapshots, exactly as on a node; the getters read the newest one
and never wait. With the cache off there is no watch: the prefix is read (at one
revision) before every ``request`` and ``refresh``, and the getters answer from the last
read. Either way the published view only moves forward in revision: a ``refresh`` may
overtake the watch, and a watch snapshot older than it is not published. While the watch
has been broken for longer than ``cache_ttl``, ``request`` first re-reads the prefix (a
failed re-read is logged and the request routes from the last view, as nodes do).

A request. ``request(key, method, payload)`` has one budget, ``request_timeout`` (or
``timeout``), for everything: waiting for a partition map and a leader, connecting, the
call, and retries. Each round sends ``method(payload)`` to the node the view names as the
leader of ``get_partition(key)`` and then:

- answer: returned;
- ``RemoteError`` of type ``NotLeader`` with a hint naming a live node: that node is tried
  at once (at most ``MAX_HOPS`` hops in a row, so two nodes blaming each other cannot spin);
- ``NotLeader`` without a usable hint, ``PeerUnreachable`` (the leader died, or is
  leaving), or no leader at all: wait until the view names another leader for the
  partition, or a short, doubling backoff passes (with the cache off: sleep the backoff
  and re-read), then go again;
- any other ``RemoteError``, ``PeerAuthFailed``: raised at once.

When the budget runs out the error says what kept the request from an answer, with the
last failure as its ``__cause__``: :class:`ClusterNotReady` (never a map),
:class:`NotLeader` (no leader, or nodes kept refusing), :class:`PeerUnreachable` (the
leader could not be reached, or did not answer in time), or :class:`EtcdTimeout` (a read
of the cluster from etcd was still running).

Delivery is at least once: a request that reached a node whose answer was lost (the
connection broke, the leader died) is sent again, so a handler may run twice for one call.
Handlers that change state should be idempotent (e.g. carry a request id, or fence with
the leader epoch).
"""

from __future__ import annotations

import math
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import mmh3
import trio

from ._actors.cell import Latest, wait_first
from ._actors.watcher import WatcherActor
from ._boundary import reraise
from ._config import ClientConfig, Config
from ._core.keys import KeyLayout
from ._core.problems import ProblemLog
from ._core.records import Node
from ._core.view import EMPTY_VIEW, ClusterView, Owner, ViewState
from ._errors import (
    ClusterNotReady,
    EtcdError,
    EtcdTimeout,
    NotLeader,
    PeerAuthFailed,
    PeerUnreachable,
    RemoteError,
)
from ._etcd.bridge import AioBridge
from ._etcd.client import EtcdClient, open_etcd_client
from ._grpc.channel import GrpcPool, TrioChannel
from ._grpc.tls import channel_tls_credentials
from ._peers.keyring import Keyring
from ._peers.secret import (
    DEFAULT_ROTATION_WINDOW,
    SecretKeeper,
    configured_secret,
    rotate_secret,
    shared_secret,
)
from ._peers.tls import client_context
from ._peers.transport import PeerPool

# Remote error types that mean "not the leader (any more)": retried, following the hint.
NOT_LEADER_TYPES = frozenset({"NotLeader", "LeadershipLost"})

FIRST_BACKOFF = 0.05
MAX_BACKOFF = 0.5
MAX_HOPS = 2  # NotLeader hints followed in a row before waiting for the view


@dataclass
class _Trace:
    """What one request ran into, for the error raised when its time runs out."""

    partition: int | None = None
    last: BaseException | None = None
    hint: str | None = None
    sending_to: str | None = None
    reading: bool = False


def _live(view: ClusterView, node_id: str | None) -> Node | None:
    """The registered node ``node_id`` with a peer endpoint, or None."""
    node = view.nodes.get(node_id) if node_id is not None else None
    return node if node is not None and node.peer_addr() else None


def _hint(exc: RemoteError) -> str | None:
    data = exc.data
    leader = data.get("leader") if isinstance(data, dict) else None
    return leader if isinstance(leader, str) and leader else None


class RoutingClient:
    """Routes keys to partition leaders; get one from :func:`open_client`.

    The getters never wait and never touch etcd: they read :attr:`view`. They need the
    partition map (P comes from it), so before any node has formed the cluster they raise
    :class:`ClusterNotReady`; :meth:`request` waits for the map within its budget instead.

    Attributes:
        client_id: the id this client presents to nodes in the peer handshake.
    """

    def __init__(
        self,
        config: ClientConfig,
        etcd: EtcdClient,
        nursery: trio.Nursery,
        client_id: str,
        secret: bytes | Keyring | None,
    ) -> None:
        self._config = config
        self._etcd = etcd
        self._nursery = nursery
        self.client_id = client_id
        self._secret = secret
        self._layout = KeyLayout(config.etcd_prefix)
        self._views: Latest[ClusterView] = Latest(EMPTY_VIEW, "client view")
        self._connected: Latest[bool] = Latest(False, "client watch")
        self._watcher: WatcherActor | None = None
        self._tls: ssl.SSLContext | None = (
            client_context(config.peer_tls_ca) if config.peer_tls_ca is not None else None
        )
        self._pool: PeerPool | None = None
        self._grpc: GrpcPool | None = None
        self._closed = False
        self._mmh3 = mmh3.hash
        self._log = config.log
        self._problems = ProblemLog(config.log, "clusterkit client")
        self._disconnected_at: float | None = None
        self._read_at = -math.inf
        self._counters = dict.fromkeys(
            (
                "requests",
                "attempts",
                "retries",
                "redirects",
                "unreachable",
                "abandoned",
                "timeouts",
                "reads",
                "stale_reads",
                "read_failures",
                "garbage",
            ),
            0,
        )

    def __repr__(self) -> str:
        v = self._views.value
        return (
            f"<RoutingClient {self.client_id} rev={v.revision} nodes={len(v.nodes)}"
            f" map_version={v.map.version if v.map else None}"
            f" cache={'on' if self._config.cache_enabled else 'off'}"
            f"{' closed' if self._closed else ''}>"
        )

    # -- routing (never awaits) ----------------------------------------------------------

    @property
    def view(self) -> ClusterView:
        """The newest immutable snapshot of the cluster this client has."""
        return self._views.value

    def _partitions(self) -> int:
        record = self._views.value.map
        if record is None:
            raise ClusterNotReady(
                f"no partition map at {self._layout.map.decode()} yet: no node has formed "
                "the cluster under this prefix"
            )
        return record.partitions

    def _check(self, partition: int) -> None:
        count = self._partitions()
        if not 0 <= partition < count:
            raise ValueError(f"partition {partition} is not in range({count})")

    def get_partition(self, key: str | bytes) -> int:
        """The partition of ``key``: ``mmh3(key) mod P``, the same answer as every node's.

        Raises:
            ClusterNotReady: there is no partition map yet, so P is unknown.
        """
        return self._mmh3(key, 0, False) % self._partitions()

    def get_leader(self, partition: int) -> Node | None:
        """The node holding ``partition``'s leader key in the view (None: no leader).

        A leader whose node record is gone is returned as ``Node(id, "", state="gone")``,
        as nodes do.

        Raises:
            ClusterNotReady: there is no partition map yet.
            ValueError: ``partition`` is not in ``range(P)``.
        """
        self._check(partition)
        view = self._views.value
        owner = view.leaders.get(partition)
        if owner is None:
            return None
        return view.nodes.get(owner.node_id) or Node(owner.node_id, "", state="gone")

    def leader_epoch(self, partition: int) -> int | None:
        """The fencing epoch of ``partition``'s leader (its key's create_revision), or None.

        Raises:
            ClusterNotReady: there is no partition map yet.
            ValueError: ``partition`` is not in ``range(P)``.
        """
        self._check(partition)
        owner = self._views.value.leaders.get(partition)
        return owner.create_revision if owner is not None else None

    def get_replicas(self, partition: int) -> list[Node]:
        """The replicas of ``partition``, preferred leader first.

        Raises:
            ClusterNotReady: there is no partition map yet.
            ValueError: ``partition`` is not in ``range(P)``.
        """
        self._check(partition)
        return list(self._views.value.replica_nodes[partition])

    def get_nodes(self) -> list[Node]:
        """The registered (alive) nodes, sorted by id (empty before any node joined)."""
        nodes = self._views.value.nodes
        return [nodes[k] for k in sorted(nodes)]

    def statistics(self) -> dict[str, dict[str, int]]:
        """Counters by component: this client's (requests, attempts, retries, redirects,
        unreachable, timeouts, reads, ...) and, with the cache on, its watcher's."""
        stats = {"RoutingClient": dict(self._counters)}
        if self._watcher is not None:
            stats["WatcherActor"] = self._watcher.statistics()
        return stats

    # -- reading the cluster -------------------------------------------------------------

    async def refresh(self) -> ClusterView:
        """Re-read the whole cluster prefix from etcd at one revision and publish it.

        Returns:
            The newest view (the one just read, unless the watch is already past it).

        Raises:
            EtcdError: the read failed (e.g. :class:`EtcdUnavailable`).
            trio.ClosedResourceError: the client's ``async with`` block has ended.
        """
        if self._closed:
            raise trio.ClosedResourceError("the routing client is closed")
        snapshot = await self._etcd.get_prefix(self._layout.root)
        state = ViewState(self._layout)
        for kv in snapshot.kvs:
            problem = state.apply_kv(kv)
            if problem is not None:
                self._counters["garbage"] += 1
                parsed = self._layout.parse(kv.key)
                self._problems.report(parsed.kind if parsed is not None else "unknown", problem)
        self._counters["reads"] += 1
        self._read_at = trio.current_time()
        self._publish(state.snapshot(snapshot.revision))
        return self._views.value

    async def wait_ready(self, *, leaders: bool = True) -> ClusterView:
        """Wait until the cluster has a partition map (and, with ``leaders``, every partition
        a leader): what a client that starts with its cluster waits for before routing.

        Bound it with ``trio.fail_after``. With the cache off, the cluster is re-read every
        0.1 s meanwhile.

        Returns:
            The view that satisfied it.
        """

        def ready(view: ClusterView) -> bool:
            record = view.map
            return record is not None and (not leaders or len(view.leaders) == record.partitions)

        while not ready(self._views.value):
            if self._config.cache_enabled:
                await self._views.wait_for(ready)
            else:
                await trio.sleep(0.1)
                await self.refresh()
        return self._views.value

    def _publish(self, view: ClusterView) -> None:
        if view.revision > self._views.value.revision:
            self._views.set(view)

    def _stale(self) -> bool:
        since = self._disconnected_at
        return (
            not self._connected.value
            and since is not None
            and trio.current_time() - max(since, self._read_at) > self._config.cache_ttl
        )

    async def _fresh_view(self, deadline: float) -> None:
        """Make the view fresh enough to route with (see the module docstring)."""
        if not self._config.cache_enabled:
            await self.refresh()
        elif self._stale():
            self._counters["stale_reads"] += 1
            # Half the remaining budget at most: if etcd is down too, route from the view.
            problem: object = "timed out"
            with trio.move_on_after((deadline - trio.current_time()) / 2):
                try:
                    await self.refresh()
                    return
                except EtcdError as exc:
                    problem = exc
            self._counters["read_failures"] += 1
            self._log.warning("clusterkit client: re-reading a stale view: %s", problem)

    async def _wait_change(
        self, changed: Callable[[ClusterView], bool], backoff: float, trace: _Trace
    ) -> None:
        """Wait until ``changed(view)`` or ``backoff`` seconds pass (cache off: sleep, read)."""
        if self._config.cache_enabled:
            with trio.move_on_after(backoff):
                await self._views.wait_for(changed)
        else:
            await trio.sleep(backoff)
            trace.reading = True
            await self.refresh()
            trace.reading = False

    # -- requests ------------------------------------------------------------------------

    async def request(
        self,
        key: str | bytes | None,
        method: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        partition: int | None = None,
    ) -> Any:
        """Call ``method(payload)`` on the leader of ``key``'s partition; return its answer.

        ``partition=pt`` (with ``key`` None) routes to the leader of partition ``pt`` itself:
        for work that is per partition rather than per key (a queue consumer fetching a
        partition's log, a repair job).

        Retries on ``NotLeader`` (following the node's hint) and on an unreachable leader
        until the leader answers or the budget runs out. A retried call may run twice on
        the server (at-least-once delivery): make handlers idempotent.

        Args:
            key: the routing key (``str`` is hashed as UTF-8).
            method: the peer handler's method name.
            payload: any msgpack value.
            timeout: the whole budget in seconds, retries included. Default
                ``request_timeout``.

        Returns:
            The handler's answer.

        Raises:
            RemoteError: the handler raised something other than ``NotLeader`` (e.g.
                ``remote_type == "UnknownMethod"``); raised at once, never retried.
            PeerAuthFailed: the nodes do not share this client's cluster secret.
            ClusterNotReady: time ran out before any partition map existed.
            NotLeader: time ran out while the partition had no leader, or while its nodes
                kept refusing (``leader`` holds the last hint).
            PeerUnreachable: time ran out while the leader could not be reached (or did
                not answer).
            EtcdTimeout: time ran out while reading the cluster (or its secret) from etcd.
            EtcdError: with ``cache_enabled=False``, reading the cluster failed.
            ValueError: ``timeout`` is not a positive number.
            trio.ClosedResourceError: the client's ``async with`` block has ended.
        """
        if self._closed:
            raise trio.ClosedResourceError("the routing client is closed")
        if (key is None) == (partition is None):
            raise ValueError("give a key or a partition (one of them)")
        if partition is not None and (type(partition) is not int or partition < 0):
            raise ValueError("partition must be a non-negative integer")
        budget = self._config.request_timeout if timeout is None else timeout
        if (
            not isinstance(budget, int | float)
            or isinstance(budget, bool)
            or not math.isfinite(budget)
            or budget <= 0
        ):
            raise ValueError("timeout must be a positive number of seconds")
        self._counters["requests"] += 1
        trace = _Trace()
        deadline = trio.current_time() + budget
        with trio.move_on_at(deadline):
            return await self._route(key, partition, method, payload, deadline, trace)
        self._counters["timeouts"] += 1
        raise _timed_out(method, budget, trace) from trace.last

    async def _route(
        self,
        key: str | bytes | None,
        partition: int | None,
        method: str,
        payload: Any,
        deadline: float,
        trace: _Trace,
    ) -> Any:
        trace.reading = True
        await self._fresh_view(deadline)
        trace.reading = False
        backoff = FIRST_BACKOFF
        hops = 0
        hint: str | None = None
        sent = False
        while True:
            view = self._views.value
            if view.map is None:
                trace.last = ClusterNotReady("no partition map yet")
                await self._wait_change(lambda v: v.map is not None, backoff, trace)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            if key is not None:
                pt = self._mmh3(key, 0, False) % view.map.partitions
            elif partition is not None and partition < view.map.partitions:
                pt = partition
            else:
                raise ValueError(f"partition {partition} is not in range({view.map.partitions})")
            trace.partition = pt
            owner = view.leaders.get(pt)
            target = _live(view, hint) or _live(view, owner.node_id if owner else None)
            hint = None
            if target is not None:
                trace.reading = self._pool is None  # the secret may have to be read
                pool = await self._peer_pool()
                trace.reading = False
                if sent:
                    self._counters["retries"] += 1
                sent = True
                self._counters["attempts"] += 1
                trace.sending_to = target.id  # left set if the deadline cancels the call
                try:
                    left = max(deadline - trio.current_time(), 0.0)
                    return await self._attempt(pool, target, pt, method, payload, left)
                except RemoteError as exc:
                    trace.sending_to = None
                    if exc.remote_type not in NOT_LEADER_TYPES:
                        raise
                    self._counters["redirects"] += 1
                    trace.last, trace.hint = exc, _hint(exc)
                    if trace.hint != target.id and _live(view, trace.hint) and hops < MAX_HOPS:
                        hint, hops = trace.hint, hops + 1
                        continue
                except PeerUnreachable as exc:
                    trace.sending_to = None
                    self._counters["unreachable"] += 1
                    trace.last = exc
            else:
                trace.last = NotLeader(f"partition {pt} has no live leader")
            await self._wait_change(_leader_changed(pt, owner), backoff, trace)
            backoff = min(backoff * 2, MAX_BACKOFF)
            hops = 0

    async def call(
        self, node: Node | str, method: str, payload: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Call ``method(payload)`` on one node (a :class:`Node` or a live node id), once:
        no routing, no retries (for admin and diagnostics calls).

        Raises:
            PeerUnreachable: the node is not live in the view, or did not answer in time.
            RemoteError: the handler raised.
        """
        if isinstance(node, str):
            found = self.view.nodes.get(node)
            if found is None:
                raise PeerUnreachable(f"node {node!r} is not a live member of the cluster")
            node = found
        budget = self._config.request_timeout if timeout is None else timeout
        pool = await self._peer_pool()
        return await pool.request(node.peer_addr(), method, payload, timeout=budget)

    async def _attempt(
        self, pool: PeerPool, target: Node, pt: int, method: str, payload: Any, timeout: float
    ) -> Any:
        """One call to ``target``, abandoned (as unreachable) as soon as the view names a new
        leader term for ``pt`` held by another live node: a frozen leader must not cost the
        whole budget when its successor is already known."""
        addr = target.peer_addr()
        if not self._config.cache_enabled:
            return await pool.request(addr, method, payload, timeout=timeout)
        outcome: list[Any] = []

        before = self._views.value.leaders.get(pt)

        def moved(view: ClusterView) -> bool:  # a new leader term, held by another live node
            owner = view.leaders.get(pt)
            return (
                owner is not None
                and owner != before
                and owner.node_id != target.id
                and owner.node_id in view.nodes
            )

        async def call() -> None:
            try:
                outcome.append((True, await pool.request(addr, method, payload, timeout=timeout)))
            except (RemoteError, PeerUnreachable, PeerAuthFailed, ValueError) as exc:
                outcome.append((False, exc))

        await wait_first(call, partial(self._views.wait_for, moved))
        if not outcome:
            self._counters["abandoned"] += 1
            raise PeerUnreachable(f"the leader of partition {pt} moved away from {target.id}")
        ok, value = outcome[0]
        if ok:
            return value
        raise value

    def _follow_rotations(self, keys: Keyring) -> None:
        """Adopt rotations of the stored secret for the client's life (it never writes it)."""
        follower = SecretKeeper(self._etcd, self._layout, keys, self._config.log, writes=False)
        self._nursery.start_soon(follower.run)

    async def grpc_channel(self, node: Node | str) -> TrioChannel:
        """A gRPC channel to ``node``'s gRPC server whose stubs are Trio calls.

        The Go README's client step (``grpc.Dial(leader.GRPCAddr())``):
        ``stub = MyStub(await client.grpc_channel(client.get_leader(pt)))``, then
        ``await stub.Set(request, timeout=2)``. Calls carry the cluster secret's credentials
        (read from etcd on first use when none is configured); over TLS when ``peer_tls_ca``
        is set. One channel per address, for the client's life.

        Raises:
            PeerUnreachable: the node is unknown or advertises no gRPC address.
            PeerAuthFailed: no secret is configured and none is stored in etcd.
        """
        if self._closed:
            raise PeerUnreachable("the routing client is closed")
        if self._grpc is None:
            await self._peer_pool()  # the secret, and with it the rotations followed
            if self._grpc is None:
                ca = self._config.peer_tls_ca
                self._grpc = GrpcPool(
                    AioBridge("client-grpc"),
                    caller=self.client_id,
                    secret=lambda: self._secret,
                    resolve=lambda n: self.view.nodes.get(n) if isinstance(n, str) else n,
                    credentials=channel_tls_credentials(ca, None, None) if ca else None,
                )
        return self._grpc.get(node)

    async def _peer_pool(self) -> PeerPool:
        """The connection pool, created once the cluster secret is known.

        Raises:
            PeerAuthFailed: no secret is configured and none is stored in etcd.
        """
        if self._pool is None:
            secret = self._secret
            if secret is None:
                secret = await shared_secret(self._etcd, self._layout, create=False)
                self._follow_rotations(secret)
            if self._pool is None:
                self._secret = secret
                self._pool = PeerPool(
                    self._nursery,
                    self.client_id,
                    secret,
                    ssl_context=self._tls,
                    max_frame=self._config.peer_max_message,
                )
        return self._pool

    # -- lifecycle -----------------------------------------------------------------------

    async def _start(self) -> None:
        """Load the first view (and, with the cache on, follow the prefix from then on)."""
        if not self._config.cache_enabled:
            await self.refresh()
            return
        source: Latest[ClusterView] = Latest(EMPTY_VIEW, "watch view")
        self._watcher = WatcherActor(
            self._etcd, self._config, self._layout, source, self._connected
        )
        await self._nursery.start(self._watcher.run)
        self._publish(source.value)
        self._nursery.start_soon(self._forward, source)
        self._nursery.start_soon(self._track_connection)

    async def _forward(self, source: Latest[ClusterView]) -> None:
        version = source.version
        while True:
            view, version = await source.wait_newer(version)
            self._publish(view)

    async def _track_connection(self) -> None:
        while True:
            await self._connected.wait_for(lambda up: not up)
            self._disconnected_at = trio.current_time()
            await self._connected.wait_for(lambda up: up)
            self._disconnected_at = None

    async def _aclose(self) -> None:
        self._closed = True
        if self._pool is not None:
            await self._pool.aclose()
        if self._grpc is not None:
            await self._grpc.aclose()
            await self._grpc.bridge.aclose()


def _leader_changed(partition: int, owner: Owner | None) -> Callable[[ClusterView], bool]:
    return lambda view: view.leaders.get(partition) != owner


def _timed_out(method: str, budget: float, trace: _Trace) -> Exception:
    what = f"request {method!r}"
    if trace.partition is not None:
        what += f" for partition {trace.partition}"
    what += f" got no answer within {budget}s"
    last = trace.last
    if trace.reading:
        return EtcdTimeout(f"{what}: reading the cluster from etcd did not finish in time")
    if trace.sending_to is not None:
        return PeerUnreachable(f"{what}: {trace.sending_to} did not answer in time")
    match last:
        case None | ClusterNotReady():
            return ClusterNotReady(f"{what}: no node has formed the cluster (no partition map)")
        case PeerUnreachable():
            return PeerUnreachable(f"{what}: the leader is unreachable ({last})")
        case RemoteError():
            return NotLeader(f"{what}: the nodes refused it ({last})", leader=trace.hint)
        case _:
            return NotLeader(f"{what}: {last}", leader=trace.hint)


@asynccontextmanager
async def open_client(config: ClientConfig) -> AsyncIterator[RoutingClient]:
    """Open a routing client for the duration of the ``async with`` block.

    Everything the client runs (the watch, peer connections) lives in one nursery; leaving
    the block closes the connections and the watch. The exception policy at the boundary
    is ``open_cluster``'s: the body's own exception wins, and a single real error is raised
    as itself, not wrapped in a group.

    Yields:
        The :class:`RoutingClient`, once it has a view of the cluster (which may have no
        nodes or map yet).

    Raises:
        TypeError: ``config`` is not a :class:`ClientConfig`.
        EtcdUnavailable: etcd did not answer within ``dial_timeout``.
        EtcdError: reading the cluster prefix failed.
    """
    if not isinstance(config, ClientConfig):
        raise TypeError(
            f"open_client expects a clusterkit.ClientConfig, got {type(config).__name__}"
        )
    client_id = config.client_id or f"client-{secrets.token_hex(6)}"
    user_error: BaseException | None = None
    try:
        async with open_etcd_client(config.etcd_config()) as etcd, trio.open_nursery() as nursery:
            secret: bytes | Keyring | None = None
            if config.resolved_secret is not None:
                secret = configured_secret(config.resolved_secret)
            else:
                try:
                    secret = await shared_secret(etcd, KeyLayout(config.etcd_prefix), create=False)
                except PeerAuthFailed:
                    secret = None  # no node yet: read it at the first request
            client = RoutingClient(config, etcd, nursery, client_id, secret)
            if isinstance(secret, Keyring):
                client._follow_rotations(secret)
            await client._start()
            try:
                yield client
            except BaseException as exc:
                user_error = exc
                raise
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await client._aclose()
                nursery.cancel_scope.cancel()
    except BaseException as group:
        reraise(
            group,
            user_error,
            lambda leaf: config.log.error(
                "clusterkit client %s: while closing: %r", client_id, leaf
            ),
        )


async def rotate_cluster_secret(
    config: ClientConfig | Config, *, window: float = DEFAULT_ROTATION_WINDOW
) -> float:
    """Replace the cluster secret stored in etcd with a new random one, without downtime.

    Every running node and routing client adopts the new secret from its watch; the old one
    stays accepted for ``window`` seconds (and is what nodes dial with during the first half),
    then only the new one works and the old one is removed from etcd. Nodes must see the
    rotation within half a window and their clocks agree to within half a window. The same as
    ``clusterkit secret rotate``.

    Args:
        config: where the cluster is (``etcd_endpoints``, ``etcd_prefix``, TLS, user).
        window: seconds both secrets are accepted (default 300).

    Returns:
        The wall-clock time (``time.time()``) at which the old secret stops being accepted.

    Raises:
        SecretRotationError: no secret is stored (the cluster uses ``cluster_secret``, or no
            node has started), a rotation is still in progress, or the key changed meanwhile.
        ConfigError: ``window`` is not a positive, finite number of seconds.
        EtcdError: etcd could not be reached.
    """
    async with open_etcd_client(config.etcd_config()) as etcd:
        keys = await rotate_secret(etcd, KeyLayout(config.etcd_prefix), window=window)
    return keys.rotated_at + keys.window
