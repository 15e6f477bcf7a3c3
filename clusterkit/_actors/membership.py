"""The membership actor: session lease, node registration, keepalive, loss and rejoin.

Theory of operation
-------------------
A node is a member while its key ``P/nodes/<id>`` exists; the key is bound to the node's
*session lease*, so etcd deletes it when the node stops refreshing the lease.

Joining: check the cluster's identity ``P/cluster`` (P, R, hash function, map format: created
with ``create_revision == 0`` by the first node to join, from the stored map's P and R for a
cluster older than that key, and compared by every later join; a mismatch or garbage there is
:class:`ClusterMismatch` before anything is registered), grant a lease of ``session_ttl``
seconds (etcd may grant more — the granted TTL is what counts), then create the node key
in a Txn that only succeeds while the key does not exist. If it exists under another lease,
another live node has this id: :class:`NodeIdConflict`, and that node is left untouched. If
it exists under one of *our* earlier leases (we declared a session lost that etcd had not
expired yet), we revoke that old lease and try again.

Keeping alive: every ``heartbeat_interval`` one keepalive goes out — sent by the etcd
client's keepalive *pump* on its lease thread, by that thread's own timer, so a starved or
blocked Trio loop does not delay it (the actor credits the pump's acks and checks in; the
pump stops after ``STALL_TTLS`` TTLs without a check-in, so a hung process loses its lease);
without a pump (a non-default Trio clock) the actor sends it from Trio. etcd's answer
proves the lease lives until ``sent_at + ttl`` (``sent_at`` is when the request left, not when
the answer came), so that is the *local lease deadline*. If keepalives fail (etcd down,
partitioned) the actor retries quickly, and when the deadline passes it declares the session
lost at once — it does not wait for etcd to say so, because a node cut off from etcd must
stop acting as a member before etcd can expire it and let another node take over. A TTL-0
answer (lease gone) also loses the session. Losing the session publishes ``None``; the actor
then rejoins with a new lease as soon as etcd answers (backoff 0.1 s .. 2 s).

Leaving: a :class:`Leave` message revokes the lease, which deletes the node key and every
other key of the session (coordinator, leaders, ready markers) in one step, so the others see
the departure at once.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import trio

from .._config import Config
from .._core.keys import KeyLayout
from .._core.records import (
    HASH_FUNCTION,
    MAP_FORMATS,
    IdentityRecord,
    Node,
    RecordError,
    decode_identity,
    decode_map,
    encode_identity,
    encode_node,
)
from .._core.view import ClusterView
from .._errors import ClusterMismatch, ConfigError, EtcdError, LeaseNotFound, NodeIdConflict
from .._etcd.client import EtcdClient
from .._etcd.types import Compare, KeepAlive, KeyValue, Op, RangeResult
from .cell import Latest

STALL_TTLS = 3  # TTLs without a Trio check-in after which the keepalive pump stops


@dataclass(frozen=True, slots=True)
class Session:
    """A live session: the lease and the local deadline before which it surely lives."""

    lease_id: int
    ttl: int
    deadline: float
    generation: int


@dataclass(frozen=True, slots=True)
class Leave:
    """Revoke the session and stop; ``done`` is set when the node is gone from etcd."""

    done: trio.Event


@dataclass(frozen=True, slots=True)
class Drain:
    """Mark this node ``draining`` so the coordinator moves its partitions away."""

    done: trio.Event


MembershipMessage = Leave | Drain


class MembershipActor:
    """Owns this node's session lease and its node key."""

    def __init__(
        self,
        client: EtcdClient,
        config: Config,
        layout: KeyLayout,
        node: Node,
        session: Latest[Session | None],
        mailbox: trio.MemoryReceiveChannel[MembershipMessage],
    ) -> None:
        self._client = client
        self._config = config
        self._layout = layout
        self.node = node
        self.session = session
        self._mailbox = mailbox
        self._log = config.log
        self._past_leases: set[int] = set()
        self._generation = 0
        self.joins = 0
        self.sessions_lost = 0
        self.keepalives = 0
        self.reregistrations = 0  # node key put back after a delete or an alteration
        # How late keepalives left compared with their schedule, and their round trips:
        # a session is lost when these approach the TTL (seconds).
        self.max_keepalive_delay = 0.0
        self.max_keepalive_rtt = 0.0
        self._last_ack = 0.0  # sent_at of the newest ack credited (pump)
        self.left = False

    def __repr__(self) -> str:
        s = self.session.value
        state = f"lease={s.lease_id:x} ttl={s.ttl}" if s else "no session"
        return f"<MembershipActor {self.node.id} {state} joins={self.joins}>"

    def statistics(self) -> dict[str, int]:
        return {
            "joins": self.joins,
            "sessions_lost": self.sessions_lost,
            "keepalives": self.keepalives,
            "reregistrations": self.reregistrations,
            "max_keepalive_delay_ms": round(self.max_keepalive_delay * 1000),
            "max_keepalive_rtt_ms": round(self.max_keepalive_rtt * 1000),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join (raising NodeIdConflict / ClusterMismatch), then keep the session alive."""
        await self._join()
        task_status.started()
        while not self.left:
            await self._keep_alive()
            if self.left:
                return
            self.sessions_lost += 1
            self.session.set(None)
            self._log.warning("clusterkit %s: session lost; rejoining", self.node.id)
            await self._rejoin()

    # -- joining -------------------------------------------------------------------------

    async def _join(self, *, rejoin: bool = False) -> None:
        await self._check_identity(rejoin=rejoin)
        # etcd starts the lease's clock when it handles the grant, which is after we send
        # it: counting from the send keeps the local deadline on the safe (early) side.
        granted_at = trio.current_time()
        lease = await self._client.lease_grant(math.ceil(self._config.session_ttl))
        self._past_leases.add(lease.id)
        node = replace(self.node, started=time.time())
        key = self._layout.node(node.id)
        for _ in range(3):
            txn = await self._client.txn(
                [Compare.create_revision(key, "=", 0)],
                [Op.put(key, encode_node(node), lease=lease.id)],
                [Op.get(key)],
            )
            if txn.succeeded:
                break
            existing = txn.responses[0]
            assert isinstance(existing, RangeResult)
            owner_lease = existing.kvs[0].lease if existing.kvs else 0
            if owner_lease and owner_lease in self._past_leases:
                # Our own key from a session we declared lost before etcd expired it.
                with contextlib.suppress(LeaseNotFound):
                    await self._client.lease_revoke(owner_lease)
                continue
            await self._revoke_quietly(lease.id)
            raise NodeIdConflict(
                f"node id {node.id!r} is already registered by a live node "
                f"(key {key.decode()}, lease {owner_lease:x})"
            )
        else:
            await self._revoke_quietly(lease.id)
            raise NodeIdConflict(f"could not register node id {node.id!r}")
        self.node = node
        self._generation += 1
        self.joins += 1
        self.session.set(Session(lease.id, lease.ttl, granted_at + lease.ttl, self._generation))
        self._log.info(
            "clusterkit %s: registered with lease %x (ttl %ss)", node.id, lease.id, lease.ttl
        )

    async def _check_identity(self, *, rejoin: bool = False) -> None:
        """Make sure this node belongs to the cluster stored under the prefix.

        The identity (P, R, hash function, map format) is created once, at the first join,
        with ``create_revision == 0``; a cluster from before ``P/cluster`` existed gets it
        from its stored map. Every later join compares it before registering.

        A rejoining node (it was a member a moment ago) only compares: it logs garbage in
        ``P/cluster`` and goes on, and leaves a missing key for the next fresh join to
        create, so nothing written while the cluster runs takes a member down.

        Raises:
            ClusterMismatch: the cluster has another identity, or ``P/cluster`` is garbage.
        """
        key = self._layout.cluster
        for _ in range(3):
            kv = await self._client.get(key)
            if kv is not None:
                try:
                    stored = self._decode_identity(kv.value)
                except ClusterMismatch as exc:
                    if not rejoin:
                        raise
                    self._log.warning("clusterkit %s: %s", self.node.id, exc)
                    return
                try:
                    self._compare(stored)
                except ClusterMismatch as exc:
                    if not rejoin:
                        raise
                    # Written while we were a member: not our config's fault. Go on with the
                    # identity we joined under (the map keeps its shape; see view.py).
                    self._log.error("clusterkit %s: ignoring %s", self.node.id, exc)
                return
            if rejoin:
                return
            mine = self._claimed_identity(await self._client.get(self._layout.map))
            txn = await self._client.txn(
                [Compare.create_revision(key, "=", 0)],
                [Op.put(key, encode_identity(mine))],
                [Op.get(key)],
            )
            if txn.succeeded:
                self._log.info(
                    "clusterkit %s: stored the cluster identity at %s (partitions=%d, "
                    "replica_factor=%d)",
                    self.node.id,
                    key.decode(),
                    mine.partitions,
                    mine.replica_factor,
                )
                self._compare(mine)
                return
            existing = txn.responses[0]
            assert isinstance(existing, RangeResult)
            if existing.kvs:  # another node created it first: compare with theirs
                self._compare(self._decode_identity(existing.kvs[0].value))
                return
        raise ClusterMismatch(f"could not read or create the cluster identity at {key.decode()}")

    def _claimed_identity(self, stored_map: KeyValue | None) -> IdentityRecord:
        """The identity to store when there is none: the stored map's P and R (a cluster
        created before ``P/cluster`` existed), else this node's config."""
        if stored_map is not None:
            try:
                record = decode_map(stored_map.value)
            except RecordError:
                pass  # garbage is the coordinator's to overwrite, not an identity
            else:
                return IdentityRecord(record.partitions, record.replica_factor)
        return IdentityRecord(self._config.partitions, self._config.replica_factor)

    def _decode_identity(self, value: bytes) -> IdentityRecord:
        try:
            return decode_identity(value)
        except RecordError as exc:
            key = self._layout.cluster.decode()
            raise ClusterMismatch(
                f"the cluster identity at {key} is unreadable ({exc}); it holds the cluster's "
                "partitions and replica_factor: restore it, or delete it (etcdctl del "
                f"{key}) to have the next node store it again from the partition map"
            ) from None

    def _compare(self, stored: IdentityRecord) -> None:
        cfg = self._config
        prefix = self._layout.prefix
        if (stored.partitions, stored.replica_factor) != (cfg.partitions, cfg.replica_factor):
            raise ClusterMismatch(
                f"the cluster at {prefix!r} has partitions={stored.partitions}, "
                f"replica_factor={stored.replica_factor}; this node is configured with "
                f"partitions={cfg.partitions}, replica_factor={cfg.replica_factor}"
            )
        if stored.hash_function != HASH_FUNCTION:
            raise ClusterMismatch(
                f"the cluster at {prefix!r} hashes keys with {stored.hash_function!r}; this "
                f"node only knows {HASH_FUNCTION!r}"
            )
        if stored.map_format not in MAP_FORMATS:
            raise ClusterMismatch(
                f"the cluster at {prefix!r} stores its partition map in format "
                f"{stored.map_format}; this node reads formats {MAP_FORMATS}"
            )

    async def _rejoin(self) -> None:
        """Join again with backoff; a Leave that arrives meanwhile ends it without joining."""
        backoff = 0.1
        while not self.left:
            try:
                await self._join(rejoin=True)
                return
            except (NodeIdConflict, ClusterMismatch):
                raise
            except EtcdError as exc:
                self._log.info("clusterkit %s: rejoin failed (%s); retrying", self.node.id, exc)
            message = None
            with trio.move_on_after(backoff):
                message = await self._mailbox.receive()
            if message is not None:
                await self._handle(message)
            backoff = min(backoff * 2, 2.0)

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self._client.lease_revoke(lease_id)
        except EtcdError as exc:
            self._log.debug("revoking lease %x: %s", lease_id, exc)

    # -- keeping alive -------------------------------------------------------------------

    async def _keep_alive(self) -> None:
        """Return when the session is lost, or after a Leave was handled.

        With a real etcd client the keepalives are sent by a *pump* on the client's lease
        thread (its own timer, its own answers), so a starved or briefly blocked Trio loop does
        not cost the session; the Trio side credits the pump's acks to the session and checks
        in, and the pump stops by itself if the Trio side stops checking in for
        ``STALL_TTLS`` TTLs (a hung process must not hold its lease forever). Without a pump
        (a non-default Trio clock, a test double) the keepalives are sent from Trio.
        """
        session = self.session.value
        assert session is not None
        interval = self._config.heartbeat_interval
        assert interval is not None
        open_pump = getattr(self._client, "keepalive_pump", None)
        if open_pump is None:
            await self._keep_alive_from_trio()
            return
        async with contextlib.AsyncExitStack() as stack:
            try:
                pump = await stack.enter_async_context(
                    open_pump(session.lease_id, interval, stall_limit=STALL_TTLS * session.ttl)
                )
            except ConfigError:  # MockClock and the real client: no pump
                pump = None
            except EtcdError as exc:
                self._log.info("clusterkit %s: keepalive pump: %s", self.node.id, exc)
                pump = None
            if pump is None:
                await self._keep_alive_from_trio()
                return
            await self._keep_alive_with(pump, interval)

    async def _keep_alive_with(self, pump: Any, interval: float) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_pump, pump)
            try:
                while True:
                    pump.checkin()
                    latest = pump.latest()
                    if latest is not None:
                        self._credit(latest)
                    session = self.session.value
                    assert session is not None
                    failure = pump.failure
                    if failure is not None:
                        if isinstance(failure, LeaseNotFound):
                            self._log.warning(
                                "clusterkit %s: lease %x expired", self.node.id, session.lease_id
                            )
                        else:
                            self._log.warning(
                                "clusterkit %s: keepalives stopped: %s", self.node.id, failure
                            )
                        return
                    now = trio.current_time()
                    if now >= session.deadline:
                        self._log.warning(
                            "clusterkit %s: lease %x deadline passed without a keepalive answer",
                            self.node.id,
                            session.lease_id,
                        )
                        return
                    message = None
                    with trio.move_on_at(min(session.deadline, now + interval)):
                        message = await self._mailbox.receive()
                    if message is not None:
                        # Handled outside the timed scope: a Leave must never be cut off.
                        await self._handle(message)
                        if self.left:
                            return
            finally:
                nursery.cancel_scope.cancel()

    async def _follow_pump(self, pump: Any) -> None:
        """Credit every ack of the pump to the session as it arrives."""
        ack = None
        while pump.failure is None:
            try:
                ack = await pump.wait_newer(ack)
            except EtcdError as exc:
                if pump.failure is not None:
                    return  # the keep-alive loop sees it
                self._log.info("clusterkit %s: keepalive stream: %s", self.node.id, exc)
                await trio.sleep(0.05)
                continue
            self._credit(ack)

    def _credit(self, ack: KeepAlive) -> None:
        """Extend the session's local deadline to ``sent_at + ttl`` of an acknowledged
        keepalive (never shortens it)."""
        session = self.session.value
        if session is None or session.lease_id != ack.id or ack.sent_at <= self._last_ack:
            return
        if self._last_ack:
            gap = ack.sent_at - self._last_ack - (self._config.heartbeat_interval or 0)
            self.max_keepalive_delay = max(self.max_keepalive_delay, gap)
        self._last_ack = ack.sent_at
        self.keepalives += 1
        self.max_keepalive_rtt = max(self.max_keepalive_rtt, trio.current_time() - ack.sent_at)
        deadline = max(session.deadline, ack.sent_at + ack.ttl)
        if deadline != session.deadline or ack.ttl != session.ttl:
            self.session.set(replace(session, ttl=ack.ttl, deadline=deadline))

    async def _keep_alive_from_trio(self) -> None:
        """The keepalive loop in Trio (no pump): return when the session is lost, or after a
        Leave was handled."""
        interval = self._config.heartbeat_interval
        assert interval is not None
        next_beat = trio.current_time() + interval
        while True:
            session = self.session.value
            assert session is not None
            message = None
            with trio.move_on_at(min(next_beat, session.deadline)):
                message = await self._mailbox.receive()
            if message is not None:
                # Handled outside the timed scope: a Leave must never be cut off halfway.
                await self._handle(message)
                if self.left:
                    return
                continue
            now = trio.current_time()
            beat = min(next_beat, now)
            if now >= session.deadline:
                self._log.warning(
                    "clusterkit %s: lease %x deadline passed without a keepalive answer",
                    self.node.id,
                    session.lease_id,
                )
                return
            try:
                with trio.move_on_at(session.deadline):
                    ka = await self._client.lease_keepalive(
                        session.lease_id, timeout=max(0.05, session.deadline - now)
                    )
                    self.keepalives += 1
                    self.max_keepalive_delay = max(self.max_keepalive_delay, ka.sent_at - beat)
                    self.max_keepalive_rtt = max(
                        self.max_keepalive_rtt, trio.current_time() - ka.sent_at
                    )
                    deadline = max(session.deadline, ka.sent_at + ka.ttl)
                    self.session.set(replace(session, ttl=ka.ttl, deadline=deadline))
                    next_beat = now + interval
                    continue
            except LeaseNotFound:
                self._log.warning("clusterkit %s: lease %x expired", self.node.id, session.lease_id)
                return
            except EtcdError as exc:
                self._log.info("clusterkit %s: keepalive failed: %s", self.node.id, exc)
            next_beat = trio.current_time() + min(interval, 0.25)

    async def _handle(self, message: MembershipMessage) -> None:
        match message:
            case Leave(done=done):
                await self.close()
                done.set()
            case Drain(done=done):
                # Every later (re)registration carries the draining state too.
                self.node = replace(self.node, state="draining")
                session = self.session.value
                if session is not None:
                    try:
                        await self._client.put(
                            self._layout.node(self.node.id),
                            encode_node(self.node),
                            lease=session.lease_id,
                        )
                    except EtcdError as exc:
                        self._log.warning("clusterkit %s: drain: %s", self.node.id, exc)
                done.set()

    async def ensure_registered(self) -> bool:
        """Put this node's key back if it is missing or not what we wrote (an operator's
        ``etcdctl del``, garbage, a lease-less copy), under the current session's lease.

        A key held under a live lease that is not ours is left alone (another process with
        this node id: logged). Returns True when the key was written.
        """
        session = self.session.value
        if session is None or self.left:
            return False
        key = self._layout.node(self.node.id)
        value = encode_node(self.node)
        kv = await self._client.get(key)
        if kv is not None and kv.lease == session.lease_id and kv.value == value:
            return False
        if kv is not None and kv.lease and kv.lease not in self._past_leases:
            self._log.error(
                "clusterkit %s: node key %s is held under lease %x, not ours: another process "
                "uses this node id",
                self.node.id,
                key.decode(),
                kv.lease,
            )
            return False
        guard = (
            Compare.create_revision(key, "=", 0)
            if kv is None
            else Compare.mod_revision(key, "=", kv.mod_revision)
        )
        txn = await self._client.txn([guard], [Op.put(key, value, lease=session.lease_id)])
        if txn.succeeded:
            self.reregistrations += 1
            self._log.warning(
                "clusterkit %s: node key %s was %s; registered it again (lease %x)",
                self.node.id,
                key.decode(),
                "deleted" if kv is None else "altered",
                session.lease_id,
            )
        return bool(txn.succeeded)

    async def guard_registration(
        self,
        views: Latest[ClusterView],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Actor loop: while a session lives, keep this node's key as we wrote it.

        Driven by the view (the watcher's): etcd is asked only when the view shows our key
        missing or different, and at most once per heartbeat while that lasts.
        """
        interval = self._config.heartbeat_interval or 1.0
        version = 0
        task_status.started()
        while not self.left:
            with trio.move_on_after(interval):
                _, version = await views.wait_newer(version)
            mine = views.value.nodes.get(self.node.id)
            if (
                mine is not None
                and mine.addr == self.node.addr
                and mine.state == self.node.state
                and mine.endpoints == self.node.endpoints
            ):
                continue
            try:
                await self.ensure_registered()
            except EtcdError as exc:
                self._log.debug("clusterkit %s: checking the node key: %s", self.node.id, exc)
            await trio.sleep(interval)  # at most once per heartbeat

    async def close(self) -> None:
        """Revoke the session (if any) and stop being a member. Idempotent.

        ``open_cluster`` calls this, shielded and bounded, after it stopped the actors.
        """
        if self.left:
            return
        session = self.session.value
        self.session.set(None)
        if session is not None:
            await self._revoke_quietly(session.lease_id)
        self.left = True  # only now: a close cut off by cancellation is retried
