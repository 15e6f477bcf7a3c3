"""The partition reconciler: turns what changed in the views into per-partition steps.

Theory of operation
-------------------
A node may play a part in thousands of partitions, but a view change touches few of them.
The :class:`PartitionSupervisor` is one actor that keeps a :class:`PartitionState` (plain
data, no task) for every partition in which this node has a role or still leads, and steps
exactly the partitions that need it:

- the partitions the watcher reports as changed (leader key or ready marker events, taken
  from :meth:`WatcherActor.take_changes` — O(events), never a diff over P);
- when the map changes, the rows that differ between the old and the new map (one O(P)
  comparison per map version, not per view);
- when a node's record changes (join, leave, drain), the partitions of this node whose
  replicas or pending replicas name that node (an index built once per map version);
- every partition when the session generation changes (a rejoin re-syncs everything);
- every partition this node leads when the session's fence (its local lease deadline minus
  the margin) passes: one node-wide timer instead of one per leader — ``is_leader`` compares
  the clock itself, the step only runs ``on_leader_lost`` and the resign;
- partitions whose own timer is due (campaign stagger, handover backoff, retries), from one
  heap.

A step runs in a short-lived task, at most one per partition at a time (a partition marked
again while its step runs is stepped again right after), so hooks of one partition never
overlap and different partitions run concurrently up to ``hook_concurrency``. A node at rest
has no task per partition and does no work per partition: its idle cost does not grow with
the partitions it holds. All etcd writes of the steps go through one
:class:`~clusterkit._actors.batcher.EtcdBatcher`, so a join's campaigns, ready markers and
resigns cost a few Txns, not one per partition.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable

import trio

from .._core.histogram import Histogram
from .._core.hookplan import Role, role_of
from .._core.records import MapRecord
from .._core.view import EMPTY_VIEW, Changes, ClusterView
from .batcher import EtcdBatcher
from .cell import Latest
from .partition_state import (
    HANDOVER_BACKOFF,
    LOST_HOOK_TIMEOUT,
    PREFERRED_GRACE,
    RETRY_MAX,
    RETRY_MIN,
    STAGGER,
    Leadership,
    PartitionContext,
    PartitionState,
)

LAUNCH_BATCH = 128  # steps started per scheduling round of the reconciler

__all__ = [
    "HANDOVER_BACKOFF",
    "LOST_HOOK_TIMEOUT",
    "PREFERRED_GRACE",
    "RETRY_MAX",
    "RETRY_MIN",
    "STAGGER",
    "EtcdBatcher",
    "Leadership",
    "PartitionContext",
    "PartitionSupervisor",
]


class PartitionSupervisor:
    """Keeps this node's partitions in line with the views (see the module docstring)."""

    def __init__(
        self,
        ctx: PartitionContext,
        views: Latest[ClusterView],
        take_changes: Callable[[], Changes] | None = None,
    ) -> None:
        self._ctx = ctx
        self._views = views
        # Where view changes come from: the watcher's take_changes (None: diff the views,
        # for views published by hand in tests).
        self._take_changes = take_changes
        self._states: dict[int, PartitionState] = {}
        self._running: set[int] = set()
        self._dirty: set[int] = set()  # to step, not running now
        self._again: set[int] = set()  # marked while their step ran: step again after it
        self._timers: list[tuple[float, int]] = []
        self._due: dict[int, float] = {}
        self._last: ClusterView = EMPTY_VIEW
        self._index_map: MapRecord | None = None
        self._index: dict[str, set[int]] = {}
        self._mine: set[int] = set()
        self._wake = trio.Event()
        self._opened = trio.Event()
        self._fenced: object = None  # the session whose fence already woke the leaders
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self.steps = 0
        self.active: Latest[int] = Latest(0, "partition states")

    def __repr__(self) -> str:
        return (
            f"<PartitionSupervisor partitions={len(self._states)} running={len(self._running)}"
            f" timers={len(self._due)}>"
        )

    def statistics(self) -> dict[str, int]:
        return {
            "partitions": len(self._states),
            "running": len(self._running),
            "steps": self.steps,
            **self._ctx.counters,
            **self._ctx.batcher.statistics(),
        }

    def hook_seconds(self) -> dict[str, Histogram]:
        """Durations of the app's hook calls so far, by hook name."""
        return dict(self._ctx.hook_seconds)

    def unready(self) -> int:
        """Partitions the map gives this node (committed or joining) whose
        on_partition_assigned has not completed under the current session.

        O(partitions held) when the reconciler has indexed the newest map (it does so as it
        steps it); O(partitions) for a map it has not reached yet. The cached index is only
        read here, never rebuilt: it belongs to the reconciler's loop."""
        view = self._views.value
        record = view.map
        if record is None:
            return 0
        if record is self._index_map:
            mine: Iterable[int] = self._mine
        else:
            me = self._ctx.node_id
            mine = (
                pt for pt in range(record.partitions) if role_of(record, pt, me) is not Role.NONE
            )
        generation = self._ctx.generation()
        return sum(
            1
            for pt in mine
            if (state := self._states.get(pt)) is None or not state.synced(generation)
        )

    def open(self) -> None:
        """Start stepping partitions (and so running hooks): ``open_cluster`` calls this just
        before it hands the app its handle, so no hook runs before the app has it."""
        self._opened.set()

    async def stop(self) -> None:
        """Stop every partition step (leaders run on_leader_lost) and wait for that."""
        if self._scope is not None:
            self._scope.cancel()
            await self._stopped.wait()

    # -- the loop -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                await nursery.start(self._ctx.batcher.run)
                nursery.start_soon(self._follow_views)
                nursery.start_soon(self._follow_session)
                task_status.started()
                await self._opened.wait()
                view_version = -1
                gen = self._ctx.session_gen.value
                while True:
                    self._wake = trio.Event()
                    if self._views.version != view_version:
                        view_version = self._views.version
                        self._on_view(self._views.value)
                    if self._ctx.session_gen.value != gen:
                        gen = self._ctx.session_gen.value
                        self._mark(self._states)
                    now = trio.current_time()
                    self._check_fence(now)
                    while self._timers and self._timers[0][0] <= now:
                        at, pt = heapq.heappop(self._timers)
                        if self._due.get(pt) == at:
                            del self._due[pt]
                            self._mark((pt,))
                    for _ in range(min(len(self._dirty), LAUNCH_BATCH)):
                        self._launch(nursery, self._dirty.pop())
                    if self._dirty:
                        # More to step: let the launched steps (and everything else, the
                        # keepalive included) run first, so no scheduling batch of the run
                        # loop holds thousands of steps.
                        await trio.lowlevel.checkpoint()
                        continue
                    wake_at = self._timers[0][0] if self._timers else math.inf
                    wake_at = min(wake_at, self._fence_at())
                    with trio.move_on_at(wake_at):
                        await self._wake.wait()
        finally:
            with trio.CancelScope(shield=True):
                await self._lose_all()
            self._stopped.set()

    async def _follow_views(self) -> None:
        version = self._views.version
        while True:
            _, version = await self._views.wait_newer(version)
            self._wake.set()

    async def _follow_session(self) -> None:
        """Publish session generation changes; keep ``ck.leadership()`` scopes on the
        session's deadline as keepalives extend it; move the node-wide fence timer."""
        ctx = self._ctx
        version = -1
        while True:
            session, version = await ctx.session.wait_newer(version)
            generation = session.generation if session is not None else -1
            if generation != ctx.session_gen.value:
                ctx.session_gen.set(generation)
            if session is not None:
                for scopes in ctx.leadership.scopes.values():
                    for scope in scopes:
                        scope.deadline = session.deadline - ctx.margin
            self._wake.set()

    def _fence_at(self) -> float:
        session = self._ctx.session.value
        if session is None or not self._ctx.leadership.epochs or self._fenced is session:
            return math.inf
        return session.deadline - self._ctx.margin

    def _check_fence(self, now: float) -> None:
        """Wake every leader once when the session's fence passes without a keepalive."""
        session = self._ctx.session.value
        if session is None or self._fenced is session:
            return
        if now >= session.deadline - self._ctx.margin and self._ctx.leadership.epochs:
            self._fenced = session
            self._mark([pt for pt, s in self._states.items() if s.leading])

    def _mark(self, partitions: Iterable[int]) -> None:
        """Step these partitions: now, or right after the step that is running."""
        running = self._running
        for pt in partitions:
            if pt in running:
                self._again.add(pt)
            else:
                self._dirty.add(pt)

    def _launch(self, nursery: trio.Nursery, pt: int) -> None:
        state = self._states.get(pt)
        if state is None:
            view = self._views.value
            if role_of(view.map, pt, self._ctx.node_id) is Role.NONE and not _holds_key(
                view, pt, self._ctx.node_id
            ):
                return
            state = self._states[pt] = PartitionState(pt, self._ctx, self._views)
            self.active.set(len(self._states))
        self._running.add(pt)
        self._due.pop(pt, None)
        nursery.start_soon(self._step, pt, state)

    async def _step(self, pt: int, state: PartitionState) -> None:
        wake: float | None = None
        try:
            self.steps += 1
            wake = await state.step()
        finally:
            self._running.discard(pt)
            if pt in self._again:
                self._again.discard(pt)
                self._dirty.add(pt)
            if state.idle and pt not in self._dirty:
                if self._states.get(pt) is state:
                    del self._states[pt]
                    self.active.set(len(self._states))
            elif wake is not None:
                self._due[pt] = wake
                heapq.heappush(self._timers, (wake, pt))
            self._wake.set()

    async def _lose_all(self) -> None:
        """The node stops: every leader runs on_leader_lost (bounded) before the revoke."""
        leaders = [s for s in self._states.values() if s.leading]
        if not leaders:
            return
        with trio.move_on_after(LOST_HOOK_TIMEOUT + 1):
            async with trio.open_nursery() as nursery:
                for state in leaders:
                    nursery.start_soon(state.lose)

    # -- what a view changed --------------------------------------------------------------

    def _on_view(self, view: ClusterView) -> None:
        last, self._last = self._last, view
        record = view.map
        if record is not None and record.partitions != self._ctx.config.partitions:
            return  # a map of another cluster shape: never acted on
        changes = self._changes(last, view)
        if changes.everything:
            self._mark(self._states)
            self._mark(self._my_partitions(record))
            return
        if changes.map:
            self._mark(self._map_diff(last.map, record))
        # A leader key in our name with no state behind it (a campaign confirmed too late,
        # a resign that failed) gets a state too: its step removes the key.
        me = self._ctx.node_id
        self._mark(
            [pt for pt in changes.partitions if pt in self._states or _holds_key(view, pt, me)]
        )
        if changes.nodes:
            index = self._node_index(record)
            for nid in changes.nodes:
                self._mark(index.get(nid, ()))

    def _changes(self, last: ClusterView, view: ClusterView) -> Changes:
        if self._take_changes is not None:
            return self._take_changes()
        # No change feed: compare the views (views built by hand; O(P), tests only).
        changes = Changes(map=last.map != view.map)
        changes.partitions.update(
            pt
            for pt in set(view.leaders) | set(last.leaders)
            if view.leaders.get(pt) != last.leaders.get(pt)
        )
        changes.partitions.update(pt for pt, _ in set(view.ready) ^ set(last.ready))
        changes.nodes.update(
            nid
            for nid in set(view.nodes) | set(last.nodes)
            if view.nodes.get(nid) != last.nodes.get(nid)
        )
        return changes

    def _my_partitions(self, record: MapRecord | None) -> set[int]:
        """Partitions in which this node is a replica or joining (built per map version)."""
        self._node_index(record)
        return self._mine

    def _node_index(self, record: MapRecord | None) -> dict[str, set[int]]:
        """node id -> this node's partitions whose (pending) replicas name it."""
        if record is self._index_map:
            return self._index
        me = self._ctx.node_id
        index: dict[str, set[int]] = {}
        mine: set[int] = set()
        if record is not None:
            pending = record.pending
            for pt, row in enumerate(record.replicas):
                moving = pending.get(pt)
                if me in row or (moving is not None and me in moving):
                    mine.add(pt)
                    for nid in (*row, *(moving or ())):
                        index.setdefault(nid, set()).add(pt)
        for pt in self._states:  # partitions this node is leaving still care
            if pt not in mine and record is not None and 0 <= pt < len(record.replicas):
                for nid in record.replicas[pt]:
                    index.setdefault(nid, set()).add(pt)
        self._index_map, self._index, self._mine = record, index, mine
        return index

    def _map_diff(self, old: MapRecord | None, new: MapRecord | None) -> set[int]:
        """Partitions whose rows differ between two maps and that concern this node."""
        mine = self._my_partitions(new)
        if old is None or new is None or old.partitions != new.partitions:
            return mine | set(self._states)
        changed = {pt for pt in range(new.partitions) if new.replicas[pt] != old.replicas[pt]}
        changed.update(set(new.pending) ^ set(old.pending))
        changed.update(pt for pt, row in new.pending.items() if old.pending.get(pt) != row)
        return {pt for pt in changed if pt in mine or pt in self._states}


def _holds_key(view: ClusterView, pt: int, me: str) -> bool:
    """True when the view shows ``pt``'s leader key in this node's name."""
    owner = view.leaders.get(pt)
    return owner is not None and owner.node_id == me
