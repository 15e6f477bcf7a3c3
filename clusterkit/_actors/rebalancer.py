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

The coordinator compares the set of active nodes with the nodes the stored map covers.
When they differ it waits, debounced (``rebalance_delay`` of quiet, at most
``rebalance_max_delay`` in all), then computes the next map with the pure
:func:`~clusterkit._core.assignment.assign` from the stored one — so a new coordinator
resumes from where the old one stopped — and writes it. A node that flaps inside the window
causes no write at all. Each map is one put of one key: a join or leave costs a constant
number of etcd writes, whatever P is.
"""

from __future__ import annotations

import trio

from .._config import Config
from .._core.debounce import Debouncer
from .._core.handoff import Plan, commit_ready, plan
from .._core.keys import KeyLayout, valid_node_id
from .._core.records import encode_map
from .._core.view import ClusterView
from .._errors import ClusterMismatch, EtcdError
from .._etcd.client import EtcdClient
from .._etcd.types import Compare, Op
from .cell import Latest, wait_first
from .membership import Session

INLINE_ASSIGN_LIMIT = 8192  # replicas; bigger maps are computed in a worker thread


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
        assert config.rebalance_max_delay is not None
        self._debounce = Debouncer(config.rebalance_delay, config.rebalance_max_delay)
        self.term: int | None = None  # create_revision of our coordinator key
        self.maps_written = 0
        self.campaigns = 0

    def __repr__(self) -> str:
        return f"<RebalancerActor {self._node_id} term={self.term} maps={self.maps_written}>"

    def statistics(self) -> dict[str, int]:
        return {
            "coordinator": int(self.term is not None),
            "maps_written": self.maps_written,
            "campaigns": self.campaigns,
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

    def _session_ended(self, session: Session) -> bool:
        current = self._session.value
        return current is None or current.generation != session.generation

    async def _serve_session(self, session: Session) -> None:
        version = -1
        view = self._views.value
        while not self._session_ended(session):
            self._check_compatible(view)
            coordinator = view.coordinator
            if self.term is None:
                if coordinator is None or (
                    coordinator.node_id == self._node_id and coordinator.lease == session.lease_id
                ):
                    await self._campaign(session)
            elif (
                coordinator is None or coordinator.create_revision != self.term
            ) and view.revision >= self.term:
                self._log.info("clusterkit %s: no longer coordinator", self._node_id)
                self.term = None
                continue
            if self.term is not None:
                deadline = await self._maybe_rebalance(view)
            else:
                deadline = None
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

    def _check_compatible(self, view: ClusterView) -> None:
        cfg = self._config
        record = view.map
        if record is not None and (record.partitions, record.replica_factor) != (
            cfg.partitions,
            cfg.replica_factor,
        ):
            raise ClusterMismatch(
                f"the stored map has partitions={record.partitions}, replica_factor="
                f"{record.replica_factor}; this node has {cfg.partitions}, {cfg.replica_factor}"
            )

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

    async def _maybe_rebalance(self, view: ClusterView) -> float | None:
        """Write a new map if one is due; return the deadline of a pending one.

        Membership changes are debounced and then re-planned in full; ready markers of
        joining replicas are committed at once while the membership is settled.
        """
        cfg = self._config
        alive = frozenset(view.nodes)
        draining = view.draining_node_ids()
        placeable = alive - draining
        now = trio.current_time()
        deadline = self._debounce.observe(placeable, _covers(view, placeable, cfg), now)
        if deadline is None:
            if view.map is None or not view.map.pending:
                return None
            step = commit_ready(view.map, alive, view.ready)
            if step is None:
                return None
        elif now < deadline:
            return deadline
        else:
            args = (view.map, alive, draining, view.ready, cfg.partitions, cfg.replica_factor)
            if cfg.partitions * cfg.replica_factor <= INLINE_ASSIGN_LIMIT:
                step = plan(*args)  # a few ms at most
            else:
                # Up to ~1 s for P = 65536, N = 1000: off the Trio thread, so keepalives and
                # routing views keep flowing meanwhile (the GIL is released every few ms).
                step = await trio.to_thread.run_sync(plan, *args)
            if not step.changed(view.map):
                self._debounce.done()
                return None
        return await self._write(view, step, now)

    async def _write(self, view: ClusterView, step: Plan, now: float) -> float | None:
        assert self.term is not None
        record = step.record
        txn = await self._client.txn(
            [
                Compare.create_revision(self._layout.coordinator, "=", self.term),
                Compare.mod_revision(self._layout.map, "=", view.map_revision),
            ],
            [
                Op.put(self._layout.map, encode_map(record)),
                *(Op.delete(self._layout.ready(pt, n)) for pt, n in step.stale_ready),
            ],
        )
        if txn.succeeded:
            self.maps_written += 1
            self._debounce.done()
            self._log.info(
                "clusterkit %s: wrote map v%d (%d nodes, %d moves pending, %d committed)",
                self._node_id,
                record.version,
                len(record.node_ids()),
                len(record.pending),
                len(step.committed),
            )
            return None
        self._log.info("clusterkit %s: map write lost a race; re-reading", self._node_id)
        return now + 0.05


def _covers(view: ClusterView, placeable: frozenset[str], cfg: Config) -> bool:
    """True when the stored map already plans for exactly ``placeable`` (nothing to re-plan)."""
    record = view.map
    if not placeable:
        return True
    if record is None:
        return False
    want = min(cfg.replica_factor, len(placeable))
    alive = view.nodes
    for pt, row in enumerate(record.replicas):
        intended = record.pending.get(pt, row)
        if len(intended) != want or any(n not in placeable for n in intended):
            return False
        if any(n not in alive for n in row):
            return False  # a committed replica died: re-plan now
    return record.node_ids() - placeable <= frozenset(view.draining_node_ids()) and all(
        any(n in r for r in (*record.replicas, *record.pending.values())) for n in placeable
    )
