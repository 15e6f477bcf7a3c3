"""The rebalancer actor: coordinator election and the partition map.

Theory of operation
-------------------
Exactly one node at a time writes ``P/map``: the *coordinator*, the node whose id is in
``P/coordinator``. The key is created in a Txn that only succeeds while it does not exist,
under the candidate's session lease, so it disappears when the coordinator leaves or dies
and the others campaign again (within the session TTL). Every map write is a Txn guarded by
the coordinator key's ``create_revision`` (still *this* coordinator's term) and the map's
``mod_revision`` (nobody wrote a map since the one the new map was computed from), so a
deposed or paused coordinator can never overwrite a newer map.

The coordinator compares the set of active nodes with the nodes the stored map covers (in
O(nodes) per view: a :class:`~clusterkit._core.handoff.MapSummary` is computed once per
map). When they differ it waits, debounced (``rebalance_delay`` of quiet, at most
``rebalance_max_delay`` in all), then computes the next map with the pure
:func:`~clusterkit._core.handoff.plan` from the stored one — so a new coordinator resumes
from where the old one stopped — and writes it. A node that flaps inside the window causes
no write at all.

Back-pressure. While moves are in flight the coordinator commits ready rows in as few maps
as it can: all at once when every announced joining replica is ready, otherwise one map per
window, the window starting at ``commit_interval(P)`` and doubling with every partial
commit (``debounce.CommitPacer``). Checking a view costs O(1) amortized
(``handoff.ReadyTracker``, and the count of markers); the O(pending) commit runs only when
a window closes. Big maps are planned, summarized and committed in a worker
thread. Marker deletions ride in the map's Txn up to etcd's ``--max-txn-ops`` (128);
beyond that they go in Txns of their own, before the map when the old markers would
otherwise count for a move the new map announces, else after it (``handoff.delete_batches``).

The map never goes backwards and is never replanned from nothing while a good map is known.
The coordinator remembers the newest map of its own shape it has seen; when the stored map
is missing, unreadable, of another shape or older (``view.map_problem``, or what this actor
sees itself), it logs that once, counts it, and writes the newest good map back with a
version above both, guarded by the stored key's ``mod_revision``. With no good map known it
plans from nothing only over a value that does not decode at all while nothing shows a
cluster at work (no leader key, no ready marker: a fresh prefix with garbage in it);
otherwise it logs and does nothing (and neither campaigns nor keeps the coordinator key).
Nothing read from etcd makes a node exit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import trio
import trio.testing

from .._config import MAP_REQUEST_LIMIT, Config
from .._core.debounce import CommitPacer, Debouncer, commit_interval
from .._core.handoff import MapSummary, Plan, ReadyTracker, commit_ready, delete_batches, plan
from .._core.histogram import REBALANCE_BUCKETS, Histogram
from .._core.keys import KeyLayout, valid_node_id
from .._core.records import MapRecord, RecordError, decode_map, encode_map, map_version_hint
from .._core.view import ClusterView
from .._errors import EtcdError
from .._etcd.client import EtcdClient
from .._etcd.types import Compare, Op
from .cell import Latest, wait_first
from .membership import Session

INLINE_ASSIGN_LIMIT = 8192  # replicas; bigger maps are planned in a worker thread
INLINE_SCAN_LIMIT = 65536  # replicas; bigger maps are summarized and committed in a thread
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops (3.4 and 3.5)
RETRY_AFTER_CONFLICT = 0.05

T = TypeVar("T")


class RebalancerActor:
    """Campaigns for coordinator and, while it is one, keeps the map covering the members."""

    def __init__(
        self,
        client: EtcdClient,
        config: Config,
        layout: KeyLayout,
        node_id: str,
        session: Latest[Session | None],
        views: Latest[ClusterView],
    ) -> None:
        self._client = client
        self._config = config
        self._layout = layout
        self._node_id = node_id
        self._session = session
        self._views = views
        self._log = config.log
        self._shape = (config.partitions, config.replica_factor)
        self._big = config.partitions * config.replica_factor > INLINE_SCAN_LIMIT
        assert config.rebalance_max_delay is not None
        self._debounce = Debouncer(config.rebalance_delay, config.rebalance_max_delay)
        self._pacer = CommitPacer(commit_interval(config.partitions))
        self._summary: MapSummary | None = None
        self._tracker: ReadyTracker | None = None
        self._ready_count = -1
        self._written_at = 0  # etcd revision of our last map write
        self._good: MapRecord | None = None  # the newest map of our shape seen
        self._noted: set[str] = set()
        self._checked = (-1, False)  # (map revision, readable) of the last fresh-start check
        self.term: int | None = None  # create_revision of our coordinator key
        self.maps_written = 0
        self.plans_written = 0
        self.commits_written = 0
        self.repairs_written = 0
        # Rebalances this node completed as coordinator, and how long each took: from the
        # first plan with moves to the map that committed the last of them (0 s for a plan
        # that moved nothing, such as a cold start's first map).
        self.rebalances = 0
        self.rebalance_seconds = Histogram(REBALANCE_BUCKETS)
        self._rebalance_started: float | None = None
        self.map_problems = 0
        self.delete_txns = 0
        self.conflicts = 0
        self.campaigns = 0

    def __repr__(self) -> str:
        return f"<RebalancerActor {self._node_id} term={self.term} maps={self.maps_written}>"

    def statistics(self) -> dict[str, int]:
        return {
            "coordinator": int(self.term is not None),
            "maps_written": self.maps_written,
            "plans_written": self.plans_written,
            "commits_written": self.commits_written,
            "repairs_written": self.repairs_written,
            "map_problems": self.map_problems,
            "delete_txns": self.delete_txns,
            "conflicts": self.conflicts,
            "campaigns": self.campaigns,
            "rebalances": self.rebalances,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            session = await self._session.wait_for(lambda s: s is not None)
            assert session is not None
            try:
                await self._serve_session(session)
            except EtcdError as exc:
                self._log.info("clusterkit %s: rebalancer: %s; retrying", self._node_id, exc)
                await trio.sleep(0.2)
            finally:
                self.term = None
                self._rebalance_started = None

    def _session_ended(self, session: Session) -> bool:
        current = self._session.value
        return current is None or current.generation != session.generation

    async def _serve_session(self, session: Session) -> None:
        version = -1
        view = self._views.value
        while not self._session_ended(session):
            record, problem = self._stored_map(view)
            if record is None and problem is not None and await self._fresh_start(view):
                problem = None  # nothing was ever served: plan from scratch over the garbage
            blocked = record is None and problem is not None
            coordinator = view.coordinator
            if self.term is None:
                if not blocked and (
                    coordinator is None
                    or (
                        coordinator.node_id == self._node_id
                        and coordinator.lease == session.lease_id
                    )
                ):
                    await self._campaign(session)
            elif (
                coordinator is None or coordinator.create_revision != self.term
            ) and view.revision >= self.term:
                self._log.info("clusterkit %s: no longer coordinator", self._node_id)
                self.term = None
                self._rebalance_started = None
                continue
            elif blocked:
                await self._resign()
                continue
            deadline = None
            if self.term is not None:
                if problem is not None:
                    assert record is not None
                    deadline = await self._repair(view, record)
                else:
                    deadline = await self._maybe_rebalance(view, record)
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                view, version = await self._wait_view_or_session(version, session)

    async def _wait_view_or_session(
        self, version: int, session: Session
    ) -> tuple[ClusterView, int]:
        """The next view; returns early (with the current view) when the session changes."""
        if version >= 0:
            await wait_first(
                lambda: self._views.wait_newer(version),
                lambda: self._session.wait_for(
                    lambda s: s is None or s.generation != session.generation
                ),
            )
        return self._views.value, self._views.version

    def _stored_map(self, view: ClusterView) -> tuple[MapRecord | None, str | None]:
        """The map to plan from, and what is wrong with the stored one (None: nothing).

        The newest good map wins: the view's (it keeps the last good one itself) or the one
        this actor remembers. A problem is logged once per stored revision and counted.
        """
        record, problem = view.map, getattr(view, "map_problem", None)
        good = self._good
        if record is not None and (record.partitions, record.replica_factor) != self._shape:
            problem = problem or (
                f"the stored map has partitions={record.partitions}, replica_factor="
                f"{record.replica_factor}; this node has {self._shape[0]}, {self._shape[1]}"
            )
            record = None
        if record is None and problem is None:
            if view.map_revision != 0:
                problem = "the stored map does not decode"
            elif good is not None:
                problem = "the stored map was deleted"
        if record is not None:
            if good is None or record.version >= good.version:
                self._good = good = record
            elif problem is None:
                problem = f"the stored map v{record.version} is older than v{good.version}"
        if problem is None:
            return record, None
        note = f"{view.map_revision}: {problem}"
        if note not in self._noted:
            self._noted.add(note)
            self.map_problems += 1
            self._log.warning(
                "clusterkit %s: %s (%s); %s",
                self._node_id,
                self._layout.map.decode(),
                problem,
                f"restoring map v{good.version}" if good else "no good map known: waiting",
            )
            if len(self._noted) > 64:
                self._noted = {note}
        return good, problem

    async def _fresh_start(self, view: ClusterView) -> bool:
        """With no good map known and a bad stored one: may this node plan from nothing?

        Only when the stored value does not decode at all (a map of another shape is
        another cluster's) and nothing shows a cluster at work: no leader, no ready marker.
        """
        if self._checked[0] != view.map_revision:
            kv = await self._client.get(self._layout.map)
            readable = False
            if kv is not None:
                try:
                    decode_map(kv.value)
                    readable = True
                except RecordError:
                    pass
            self._checked = (view.map_revision, readable)
        return not self._checked[1] and not view.leaders and not view.ready

    async def _campaign(self, session: Session) -> None:
        self.campaigns += 1
        key = self._layout.coordinator
        txn = await self._client.txn(
            [Compare.create_revision(key, "=", 0)],
            [Op.put(key, self._node_id, lease=session.lease_id)],
            [Op.get(key)],
        )
        if txn.succeeded:
            self.term = txn.revision
            self._log.info("clusterkit %s: became coordinator (term %d)", self._node_id, self.term)
            return
        existing = txn.responses[0]
        kvs = getattr(existing, "kvs", ())
        if not kvs:
            return
        kv = kvs[0]
        holder = kv.value.decode(errors="replace")
        if holder == self._node_id and kv.lease == session.lease_id:
            self.term = kv.create_revision  # our own key from this session
        elif kv.lease == 0 or not valid_node_id(holder):
            # Not a coordinator's key (no session lease, or no node id in it): it would
            # never expire and nobody could ever coordinate. Remove exactly that version.
            self._log.warning(
                "clusterkit %s: removing a foreign %s (value %r, lease %x)",
                self._node_id,
                key.decode(),
                kv.value[:64],
                kv.lease,
            )
            await self._client.txn(
                [Compare.mod_revision(key, "=", kv.mod_revision)], [Op.delete(key)]
            )

    async def _resign(self) -> None:
        """Give the coordinator key up (this node cannot plan: no good map known)."""
        assert self.term is not None
        key = self._layout.coordinator
        await self._client.txn([Compare.create_revision(key, "=", self.term)], [Op.delete(key)])
        self._log.info("clusterkit %s: resigned as coordinator", self._node_id)
        self.term = None
        self._rebalance_started = None

    async def _offload(self, big: bool, fn: Callable[..., T], *args: object) -> T:
        """Run a pure O(P) step inline, or in a worker thread for big maps (the GIL is
        released every few ms, so keepalives and views keep flowing meanwhile).

        Under a virtual clock (``clusterkit.testing``) it always runs inline: a thread would
        let the clock jump ahead while it computes.
        """
        if big and not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    async def _summary_of(self, record: MapRecord) -> MapSummary:
        summary = self._summary
        if summary is None or summary.record is not record:
            summary = self._summary = await self._offload(self._big, MapSummary.of, record)
        return summary

    async def _maybe_rebalance(self, view: ClusterView, record: MapRecord | None) -> float | None:
        """Write a new map if one is due; return when to look again (None: on a new view).

        Membership changes are debounced and then re-planned in full; ready rows of joining
        replicas are committed, paced, while the membership is settled.
        """
        if view.revision < self._written_at:
            return None  # the view has not caught up with our last write yet
        cfg = self._config
        alive = frozenset(view.nodes)
        draining = view.draining_node_ids()
        placeable = alive - draining
        now = trio.current_time()
        if record is None:
            covered = not placeable
        else:
            summary = await self._summary_of(record)
            covered = summary.covers(placeable, alive, draining, cfg.replica_factor)
        deadline = self._debounce.observe(placeable, covered, now)
        if deadline is None:
            if record is None or not record.pending:
                return None
            return await self._maybe_commit(view, record, alive, now)
        if now < deadline:
            return deadline
        args = (record, alive, draining, view.ready, cfg.partitions, cfg.replica_factor)
        big = cfg.partitions * cfg.replica_factor > INLINE_ASSIGN_LIMIT
        step = await self._offload(big, plan, *args)
        if not step.changed(record):
            self._debounce.done()
            return None
        return await self._write(view, step, now, "plan")

    async def _maybe_commit(
        self, view: ClusterView, record: MapRecord, alive: frozenset[str], now: float
    ) -> float | None:
        tracker = self._tracker
        if tracker is None or tracker.record is not record:
            tracker = self._tracker = ReadyTracker(record)
        count = len(view.ready)
        progressed, self._ready_count = count != self._ready_count, count
        complete = tracker.all_ready(view.ready)
        due = self._pacer.observe(progressed, complete, now)
        if due is None or now < due:
            return due
        step = await self._offload(self._big, commit_ready, record, alive, view.ready)
        if step is None:
            self._pacer.done(committed=False)
            if complete:
                tracker.rewind()  # a marker went away after the tracker saw it
            return None
        return await self._write(view, step, now, "commit")

    async def _repair(self, view: ClusterView, good: MapRecord) -> float | None:
        """Write the newest good map back over a missing, unreadable or older stored one."""
        if view.revision < self._written_at:
            return None  # the view has not caught up with our last write yet
        kv = await self._client.get(self._layout.map)
        stored = map_version_hint(kv.value) if kv is not None else None
        version = max(good.version, stored or 0) + 1
        record = dataclasses.replace(good, version=version)
        return await self._write(view, Plan(record, (), ()), trio.current_time(), "repair")

    async def _write(self, view: ClusterView, step: Plan, now: float, kind: str) -> float | None:
        assert self.term is not None
        record = step.record
        value = await self._offload(self._big, encode_map, record)
        if len(value) > MAP_REQUEST_LIMIT:
            note = f"too big: v{record.version} {len(value)}"
            if note not in self._noted:
                self._noted.add(note)
                self._log.error(
                    "clusterkit %s: map v%d is %d bytes, over etcd's request limit (%d): "
                    "not written (fewer partitions, replicas or nodes needed)",
                    self._node_id,
                    record.version,
                    len(value),
                    MAP_REQUEST_LIMIT,
                )
            return None
        term = Compare.create_revision(self._layout.coordinator, "=", self.term)
        before, with_map, after = delete_batches(step, MAX_TXN_OPS)
        guard = [term, Compare.mod_revision(self._layout.map, "=", view.map_revision)]
        for batch in before:
            if not await self._delete(guard, batch):
                return self._lost_race(now)
        txn = await self._client.txn(
            guard,
            [
                Op.put(self._layout.map, value),
                *(Op.delete(self._layout.ready(pt, n)) for pt, n in with_map),
            ],
        )
        if not txn.succeeded:
            return self._lost_race(now)
        self.maps_written += 1
        if kind == "plan":
            self.plans_written += 1
        elif kind == "commit":
            self.commits_written += 1
        else:
            self.repairs_written += 1
        self._debounce.done()
        self._written_at = txn.revision
        now_s = trio.current_time()
        if kind == "plan" and self._rebalance_started is None:
            self._rebalance_started = now_s
        if not record.pending and self._rebalance_started is not None:
            self.rebalances += 1
            self.rebalance_seconds.observe(now_s - self._rebalance_started)
            self._rebalance_started = None
        if kind == "commit":
            self._pacer.done(committed=True)
        else:
            self._pacer.restart()
        self._log.info(
            "clusterkit %s: wrote map v%d (%s: %d nodes, %d moves pending, %d committed, "
            "%d markers deleted)",
            self._node_id,
            record.version,
            kind,
            len(record.node_ids()),
            len(record.pending),
            len(step.committed),
            len(step.stale_ready),
        )
        # Markers the new map no longer accounts for: harmless until a later map announces
        # the same move again, and that map deletes them first (delete_first).
        guard = [term, Compare.mod_revision(self._layout.map, "=", txn.revision)]
        for batch in after:
            if not await self._delete(guard, batch):
                break
        return None

    async def _delete(self, guard: list[Compare], markers: list[tuple[int, str]]) -> bool:
        self.delete_txns += 1
        txn = await self._client.txn(
            guard, [Op.delete(self._layout.ready(pt, n)) for pt, n in markers]
        )
        return txn.succeeded

    def _lost_race(self, now: float) -> float:
        self.conflicts += 1
        self._log.info("clusterkit %s: map write lost a race; re-reading", self._node_id)
        return now + RETRY_AFTER_CONFLICT
