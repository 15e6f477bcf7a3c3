"""One partition's hooks, readiness and leadership on this node: state plus one step.

Theory of operation
-------------------
A :class:`PartitionState` holds what this node has told the app about one partition (the
hook track), whether it leads it and under which epoch, and its retry/handover timers. It has
no task of its own: the reconciler (:mod:`~clusterkit._actors.partitions`) runs
:meth:`PartitionState.step` in a short-lived task when something about the partition changed
or a timer it asked for is due, and never runs two steps of one partition at once. A step
does everything for its partition *sequentially*, which is what makes the hook grammar hold
(``assigned -> (leader_elected -> leader_lost)* -> unassigned``, never overlapping for one
partition):

1. Hooks: :func:`~clusterkit._core.hookplan.transition` turns role changes into calls.
   ``on_partition_assigned`` is retried with backoff until it succeeds (or the role goes
   away); the other hooks are logged and counted when they raise.
2. Readiness: a joining replica whose assigned hook returned writes ``P/ready/<pt>/<id>``
   under its session lease (again after every rejoin: the marker dies with the lease). The
   coordinator commits the move only when every joining replica is ready.
3. Leadership, for committed replicas whose assigned hook completed. The preferred replica
   (first in the row) campaigns at once when there is no leader key; replica k waits
   ``k x stagger`` first, and only campaigns if there is still none. A campaign creates
   ``P/leaders/<pt>`` under the session lease only if it does not exist; the key's
   create_revision is the fencing epoch. ``is_leader`` turns true (and
   ``on_leader_elected`` runs) only for a key etcd confirmed is ours under the live session.
   A leader steps down — ``is_leader`` false first, then ``on_leader_lost``, then (if etcd
   can still be reached) a delete of the key only if its create_revision is still our
   epoch — when its session's local deadline minus a margin passes (self-fencing: before
   etcd can expire the lease and let another node win; the reconciler wakes every leader
   once when that node-wide deadline passes), when the key is gone or someone else's, when
   it is no longer a replica, and, gracefully, when the preferred replica is alive again
   (preferred-leader balance).

Every etcd operation goes through the node's :class:`~clusterkit._actors.batcher.EtcdBatcher`,
so the campaigns, ready markers and resigns of all partitions that change together share a
few Txns.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .._config import Config
from .._core.histogram import HOOK_BUCKETS, Histogram
from .._core.hookplan import HookCall, Role, Track, leadership, role_of, transition
from .._core.keys import KeyLayout
from .._core.records import Node
from .._core.view import ClusterView
from .._errors import EtcdError
from .._etcd.types import KeyValue
from .._events import (
    ClusterEvent,
    LeaderElected,
    LeaderLost,
    PartitionAssigned,
    PartitionUnassigned,
    ReplicaAdded,
    ReplicaRemoved,
)
from .batcher import EtcdBatcher
from .cell import Latest
from .membership import Session

STAGGER = 0.05  # seconds per rank before a non-preferred replica campaigns
PREFERRED_GRACE = 1.0  # extra wait while the preferred replica is registered
LOST_HOOK_TIMEOUT = 5.0  # bound on on_leader_lost when the node leaves
HANDOVER_BACKOFF = 0.25  # seconds; doubles with each handover the preferred did not take
RETRY_MIN, RETRY_MAX = 0.1, 5.0


@dataclass
class Leadership:
    """What the node leads right now; read by ``ClusterKit.is_leader`` on every call."""

    epochs: dict[int, int] = field(default_factory=dict)
    # The session generation each leadership was won under: a leadership never outlives
    # its session, even for the moment between a rejoin and the actor noticing it.
    generations: dict[int, int] = field(default_factory=dict)
    scopes: dict[int, set[trio.CancelScope]] = field(default_factory=dict)

    def end(self, partition: int) -> int | None:
        self.generations.pop(partition, None)
        epoch = self.epochs.pop(partition, None)
        for scope in self.scopes.pop(partition, set()):
            scope.cancel()
        return epoch


@dataclass
class PartitionContext:
    """What every partition actor of a node shares (read-only for them, but the counters)."""

    config: Config
    batcher: EtcdBatcher
    layout: KeyLayout
    node_id: str
    session: Latest[Session | None]
    leadership: Leadership
    limiter: trio.CapacityLimiter
    emit: Callable[[ClusterEvent], None]
    margin: float
    counters: dict[str, int] = field(default_factory=dict)
    hook_seconds: dict[str, Histogram] = field(default_factory=dict)
    # The session's generation (-1: none). Unlike ``session``, it does not change on every
    # keepalive, so partition actors are not all woken once per heartbeat.
    session_gen: Latest[int] = field(default_factory=lambda: Latest(-1, "session generation"))
    # The revision of this process's first view. A committed role in a map written before
    # it was given to an earlier incarnation of this node id (a restart within the
    # rebalance delay): its data may be gone or stale, so the assigned hook is told to pull
    # from a live replica, as for a re-sync.
    start_revision: int = 0

    def generation(self) -> int:
        """The live session's generation (-1: none), read from the session itself: the
        ``session_gen`` cell is updated a moment later, and a step must never see the new
        session's lease with the old generation (it would lead before re-syncing)."""
        session = self.session.value
        return session.generation if session is not None else -1

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def hook_duration(self, name: str, seconds: float) -> None:
        """Record how long one call of hook ``name`` ran (errors and cancellation included)."""
        histogram = self.hook_seconds.get(name)
        if histogram is None:
            histogram = self.hook_seconds[name] = Histogram(HOOK_BUCKETS)
        histogram.observe(seconds)


def _node(view: ClusterView, node_id: str | None) -> Node | None:
    if node_id is None:
        return None
    return view.nodes.get(node_id) or view.departed.get(node_id) or Node(node_id, "", state="gone")


def _previous_owner(
    view: ClusterView, pt: int, me: str, role: Role, *, resync: bool = False
) -> str | None:
    """Who holds the data: the leader, else (for a joining replica, or a replica re-syncing
    after a rejoin) a live committed one.

    A replica committed at once (cold start, or every old replica gone) has nobody to pull
    from unless a leader exists: None.
    """
    owner = view.leaders.get(pt)
    if owner is not None and owner.node_id != me and owner.node_id in view.nodes:
        return owner.node_id
    if view.map is None or (role is not Role.JOINING and not resync):
        return None
    for n in view.map.replicas[pt]:
        if n != me and n in view.nodes:
            return n
    return None


def _new_owner(view: ClusterView, pt: int, me: str, peers: tuple[str, ...]) -> str | None:
    """Who takes this node's place in ``pt``: the first node of the partition's (pending,
    else committed) row that was not a replica with us — the node that pulled the data. If
    nobody new came (the partition only shrank), its first replica, which leads it."""
    if view.map is None:
        return None
    row = view.map.pending.get(pt) or view.map.replicas[pt]
    others = [n for n in row if n != me]
    fresh = [n for n in others if n not in peers]
    if fresh:
        return fresh[0]
    return others[0] if others else None


class PartitionState:
    """Hooks, readiness and leadership of one partition on this node (stepped by the
    reconciler, one step at a time)."""

    def __init__(self, pt: int, ctx: PartitionContext, views: Latest[ClusterView]) -> None:
        self.pt = pt
        self._ctx = ctx
        self._views = views
        self._track = Track()
        self._epoch: int | None = None
        self._ready_generation = -1
        self._ready_revision = 0  # the revision at which our marker was last written
        # The session generation under which on_partition_assigned last completed: the
        # partition's data is known current only within that session (see _resync).
        self._synced_generation: int | None = None
        self._no_leader_since: float | None = None
        self._abandoned: set[int] = set()  # epochs this actor stepped down from
        self._resigned: set[int] = set()  # epochs whose key etcd confirmed deleted
        self._handovers = 0
        self._handover_after = 0.0
        self._me = ctx.node_id
        self._key = ctx.layout.leader(pt)

    def __repr__(self) -> str:
        return f"<PartitionActor {self.pt} {self._track.role.value} epoch={self._epoch}>"

    def synced(self, generation: int) -> bool:
        """on_partition_assigned has completed for this partition under session
        ``generation`` (its data is current: what ``/ready`` reports)."""
        return generation >= 0 and self._synced_generation == generation

    @property
    def idle(self) -> bool:
        """True when the partition needs nothing more from this node: no role, not leading,
        and no leader key of ours left to remove (a resign that failed, a self-fenced term,
        a campaign won after the role went away)."""
        return (
            self._track.role is Role.NONE
            and self._epoch is None
            and self._stale_key(self._views.value) is None
        )

    def _stale_key(self, view: ClusterView) -> int | None:
        """The epoch of a leader key in our name, under our current lease, that we do not
        lead and must remove (None if there is none). Only a key that no longer stands for
        a term of ours counts: one we abandoned, or any while we are not a replica."""
        if self._epoch is not None:
            return None
        owner = view.leaders.get(self.pt)
        session = self._ctx.session.value
        if owner is None or owner.node_id != self._me or session is None:
            return None
        if owner.lease != session.lease_id or owner.create_revision in self._resigned:
            return None
        if owner.create_revision in self._abandoned:
            return owner.create_revision
        if role_of(view.map, self.pt, self._me) is not Role.REPLICA:
            return owner.create_revision
        return None

    @property
    def leading(self) -> bool:
        return self._epoch is not None

    async def step(self) -> float | None:
        """Bring the partition in line with the newest view; return when to step again."""
        return await self._step(self._views.value)

    async def lose(self) -> None:
        """The node stops while leading: the app hears on_leader_lost before the session
        is revoked and a successor can win (bounded; the caller shields it)."""
        if self._epoch is None:
            return
        epoch, self._epoch = self._epoch, None
        self._ctx.leadership.end(self.pt)
        with trio.move_on_after(LOST_HOOK_TIMEOUT):
            await self._run_hook("on_leader_lost", (self.pt,), LeaderLost(self.pt, epoch))

    async def _step(self, view: ClusterView) -> float | None:
        pt, me = self.pt, self._me
        role = role_of(view.map, pt, me)
        if role is not Role.REPLICA and self._epoch is not None:
            await self._step_down(view, resign=True)  # only committed replicas lead
        stale = self._stale_key(view)
        if stale is not None and not await self._resign(stale):
            # The key would keep the partition leaderless until our lease ends: try again.
            return trio.current_time() + RETRY_MIN
        row = view.map.replicas[pt] if view.map is not None else ()
        self._track, calls = transition(
            self._track,
            role,
            [n for n in row if n != me],
            partition=pt,
            previous_owner=_previous_owner(view, pt, me, role),
            new_owner=_new_owner(view, pt, me, self._track.peers),
        )
        for call in calls:
            if call.hook == "assigned":
                if not await self._assigned(call, view):
                    self._track = Track()  # role went away before the hook succeeded
                    return None
            else:
                await self._call(call, view)
        if self._track.assigned and not await self._resync(view):
            return None
        if role is Role.JOINING:
            return await self._mark_ready()
        if role is Role.REPLICA and view.map is not None:
            return await self._lead(view, row)
        return None

    # -- hooks ---------------------------------------------------------------------------

    async def _resync(self, view: ClusterView) -> bool:
        """After a rejoin, run on_partition_assigned again before leading or reporting ready.

        While this node had no session, the cluster counted it dead: its lease expired, and
        the other replicas may have elected a leader and taken writes it never saw — yet the
        map may still list it (it rejoined within the rebalance delay). Its data is only
        known current within the session the assigned hook last completed under, so a new
        session means pulling again (from the leader, or a live replica) first. False if
        the role went away before the hook succeeded.
        """
        generation = self._ctx.generation()
        if generation < 0 or self._synced_generation in (None, generation):
            return True  # no session yet, or already current under this one
        if self._epoch is not None:
            await self._step_down(view, resign=False)  # won under the lost session's lease
        self._ctx.count("resyncs")
        if not await self._assigned(HookCall("assigned", self.pt, None), view, resync=True):
            self._track = Track()
            return False
        return True

    async def _assigned(self, call: HookCall, view: ClusterView, *, resync: bool = False) -> bool:
        """Run on_partition_assigned until it succeeds; False if the role went away first.

        Every retry asks the newest view who to pull from: the previous owner may have died.
        """
        backoff = RETRY_MIN
        while True:
            role = role_of(view.map, self.pt, self._me)
            generation = self._ctx.generation()
            inherited = view.map is not None and view.map_revision <= self._ctx.start_revision
            owner = _previous_owner(view, self.pt, self._me, role, resync=resync or inherited)
            call = HookCall(call.hook, self.pt, owner)
            if await self._call(call, view, resync=resync):
                self._synced_generation = generation
                return True
            with trio.move_on_after(backoff):
                await self._views.wait_for(lambda v: role_of(v.map, self.pt, self._me) is Role.NONE)
                return False
            view = self._views.value
            backoff = min(backoff * 2, RETRY_MAX)

    async def _call(self, call: HookCall, view: ClusterView, *, resync: bool = False) -> bool:
        pt = call.partition
        event: ClusterEvent
        match call.hook:
            case "assigned":
                event = PartitionAssigned(pt, _node(view, call.node), resync=resync)
                args: tuple[Any, ...] = (pt, event.previous_owner)
            case "unassigned":
                event = PartitionUnassigned(pt, _node(view, call.node))
                args = (pt, event.new_owner)
            case "replica_added":
                node = _node(view, call.node)
                assert node is not None
                event, args = ReplicaAdded(pt, node), (pt, node)
            case "replica_removed":
                node = _node(view, call.node)
                assert node is not None
                event, args = ReplicaRemoved(pt, node), (pt, node)
            case _:
                raise AssertionError(call)
        return await self._run_hook(f"on_{_HOOK_NAMES[call.hook]}", args, event)

    async def _run_hook(self, name: str, args: tuple[Any, ...], event: ClusterEvent) -> bool:
        ctx = self._ctx
        hook = getattr(ctx.config, name)
        if hook is not None:
            try:
                async with ctx.limiter:
                    started = trio.current_time()
                    try:
                        result = hook(*args)
                        if inspect.isawaitable(result):
                            await result
                    finally:
                        ctx.hook_duration(name, trio.current_time() - started)
            except Exception:
                ctx.count(f"{name}_errors")
                ctx.config.log.exception("clusterkit %s: %s%r raised", self._me, name, args)
                if name != "on_partition_assigned":
                    ctx.emit(event)  # it happened all the same: keep the stream in order
                return False
        ctx.count(name)
        ctx.emit(event)
        return True

    # -- readiness -----------------------------------------------------------------------

    async def _mark_ready(self) -> float | None:
        """Write the ready marker, once per session — and again if it was deleted: the
        coordinator removes markers that predate the move its map announces, so a marker
        written before that (say, by a preferred replica asking for the lead back) must be
        written again for the move to commit."""
        session = self._ctx.session.value
        if session is None:
            return None
        view = self._views.value
        if session.generation == self._ready_generation and (
            (self.pt, self._me) in view.ready or view.revision < self._ready_revision
        ):
            return None
        try:
            self._ready_revision = await self._ctx.batcher.mark_ready(
                self._ctx.layout.ready(self.pt, self._me), session.lease_id
            )
            self._ready_generation = session.generation
            return None
        except EtcdError as exc:
            self._ctx.config.log.info("clusterkit: ready marker for %d: %s", self.pt, exc)
            return trio.current_time() + RETRY_MIN

    # -- leadership ----------------------------------------------------------------------

    async def _lead(self, view: ClusterView, row: tuple[str, ...]) -> float | None:
        ctx, pt, me = self._ctx, self.pt, self._me
        session = ctx.session.value
        owner = view.leaders.get(pt)
        now = trio.current_time()
        if self._epoch is not None:
            fence_at = session.deadline - ctx.margin if session is not None else now
            # The key is gone, or it is not the one we created under our lease any more
            # (deleted and re-created, overwritten with another value or lease): stop now.
            gone = view.revision >= self._epoch and (
                owner is None
                or owner.create_revision != self._epoch
                or owner.node_id != me
                or (session is not None and owner.lease != session.lease_id)
            )
            won_under = ctx.leadership.generations.get(pt)
            if session is not None and session.generation != won_under:
                await self._step_down(view, resign=False)  # that lease is gone with its keys
                return None
            if session is None or now >= fence_at or gone:
                reachable = session is not None and now < fence_at
                await self._step_down(view, resign=reachable and not gone)
                # Self-fenced with the session still alive: look again soon (a keepalive
                # may renew it, and then the abandoned key is removed and a new term won).
                return now + RETRY_MIN if session is not None else None
            preferred = row[0]
            back = view.nodes.get(preferred)
            if (
                preferred != me
                and (pt, preferred) in view.ready
                and back is not None
                and back.state == "active"
            ):
                if now < self._handover_after:
                    return self._handover_after
                # The preferred replica is back and says it is ready: hand over. Should it
                # not take over (it may be cut off while its marker lives on), we win the
                # partition back after the stagger and wait longer before the next try.
                self._handovers += 1
                pause = min(ctx.config.session_ttl, HANDOVER_BACKOFF * 2**self._handovers)
                self._handover_after = now + pause
                ctx.count("handovers")
                if not await self._step_down(view, resign=True):
                    return now + RETRY_MIN  # the key is still ours: the next step removes it
                return None
            self._handovers = 0
            return None  # the reconciler wakes every leader when the session's fence passes
        if session is None or not self._track.assigned:
            return None
        if owner is not None:
            self._no_leader_since = None
            if owner.node_id == me and owner.lease == session.lease_id:
                if owner.create_revision in self._abandoned:
                    # An epoch we stepped down from (self-fencing): never lead under it
                    # again. The top of the step removed it (_stale_key); once the view
                    # shows it gone, a fresh campaign gives a new, higher epoch.
                    return now + RETRY_MIN
                await self._confirm(owner.create_revision, view)  # ours, this session
                if self._epoch is None:
                    return now + RETRY_MIN  # not confirmed (etcd blip, late keepalive): again
            elif row and row[0] == me and (pt, me) not in view.ready:
                return await self._mark_ready()  # preferred and ready: ask for the lead back
            return None
        alive = [n for n in row if n in view.nodes]
        if me not in alive:
            return None
        rank = alive.index(me)  # replicas that are gone do not delay the others
        if self._no_leader_since is None:
            self._no_leader_since = now
        campaign_at = self._no_leader_since + rank * STAGGER
        if rank > 0 and row[0] == alive[0]:
            # The preferred replica is registered and should win in a moment; campaigning
            # now would only cost etcd a failing Txn per partition (thousands at a cold
            # start). Step in only if it has not taken the partition after a grace period.
            campaign_at += PREFERRED_GRACE
        if now < campaign_at:
            return campaign_at
        if not await self._campaign(session, view):
            return now + RETRY_MIN  # etcd did not answer: campaign again
        return None

    async def _campaign(self, session: Session, view: ClusterView) -> bool:
        """Try to create the leader key; False when etcd could not be asked."""
        ctx = self._ctx
        ctx.count("campaigns")
        try:
            kv = await ctx.batcher.campaign(self._key, self._me.encode(), session.lease_id)
        except EtcdError as exc:
            ctx.config.log.info("clusterkit: campaign for %d failed: %s", self.pt, exc)
            return False
        if kv is not None:
            # Created by the (batched) Txn at its revision: that is the confirmation.
            await self._confirm(kv.create_revision, view, kv)
        return True

    async def _confirm(self, epoch: int, view: ClusterView, kv: KeyValue | None = None) -> None:
        """Lead under ``epoch`` if the key (read back now, or by the winning Txn) is ours."""
        ctx = self._ctx
        if kv is None:
            try:
                kv = await ctx.batcher.get(self._key)
            except EtcdError:
                return
        if (
            kv is None
            or kv.create_revision != epoch
            or kv.value.decode(errors="replace") != self._me
        ):
            return
        session = ctx.session.value
        if session is None or kv.lease != session.lease_id:
            return
        if trio.current_time() >= session.deadline - ctx.margin:
            return
        self._track, calls = leadership(self._track, True, self.pt)
        if not calls:
            return
        self._epoch = epoch
        ctx.leadership.generations[self.pt] = session.generation
        ctx.leadership.epochs[self.pt] = epoch
        ctx.count("elections")
        if not await self._run_hook("on_leader_elected", (self.pt,), LeaderElected(self.pt, epoch)):
            await self._step_down(view, resign=True)

    async def _step_down(self, view: ClusterView, *, resign: bool) -> bool:
        """Stop leading (is_leader false first, then on_leader_lost), and with ``resign``
        delete the key; False if that delete failed (the key is still ours in etcd)."""
        ctx = self._ctx
        epoch = self._epoch
        if epoch is None:
            return True
        self._epoch = None
        self._abandoned.add(epoch)
        self._no_leader_since = None
        ctx.leadership.end(self.pt)  # is_leader is false from here on
        self._track, _ = leadership(self._track, False, self.pt)
        await self._run_hook("on_leader_lost", (self.pt,), LeaderLost(self.pt, epoch))
        if resign:
            return await self._resign(epoch)
        return True

    async def _resign(self, epoch: int) -> bool:
        """Delete the leader key if it is still the one created at ``epoch``; False when
        etcd could not be asked (the caller steps again: the key must not outlive us)."""
        try:
            await self._ctx.batcher.resign(self._key, epoch)
        except EtcdError as exc:
            self._ctx.config.log.info("clusterkit: resigning %d failed: %s", self.pt, exc)
            return False
        self._resigned.add(epoch)
        return True


_HOOK_NAMES = {
    "assigned": "partition_assigned",
    "unassigned": "partition_unassigned",
    "replica_added": "replica_added",
    "replica_removed": "replica_removed",
}
