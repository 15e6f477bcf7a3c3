"""The watcher actor: one watch on the cluster prefix, published as ClusterView snapshots.

Theory of operation
-------------------
Start: read the whole prefix at one revision R (paged, every page at R), build the view,
publish it, and only then report ready. Then watch the prefix from R + 1: each watch batch
is applied to the :class:`ViewState` and a new snapshot is published, so the view always
equals the prefix at some revision — no event lost, none invented. That revision is the
last applied event's ``mod_revision``, never a response header's: etcd sends a catch-up in
pieces of up to 1000 revisions, each stamped with the store's current revision, and
resuming after the header of the first piece would skip the rest.

When the watch fails:

- ``RevisionCompacted``: the history after our revision is gone. Re-read the prefix at a new
  revision R', replace the state with it (the new snapshot *is* the diff applied), and
  watch from R' + 1. Resuming from the compact revision instead would skip events.
- etcd unreachable: mark the node unhealthy, keep publishing nothing (routing keeps
  answering from the last view), and retry with backoff from the last revision + 1; if that
  revision was compacted meanwhile, re-read as above.

A burst (thousands of leader keys at a cold start) is applied in slices of
``APPLY_SLICE`` events with a checkpoint between them, so the node's keepalive and other
tasks are never held up by one long batch; nothing is published until the whole burst is
applied, and the change feed (``take_changes``) only ever describes published views.

Values that do not decode are logged, counted (``garbage``) and ignored.
"""

from __future__ import annotations

import trio

from .._config import ClientConfig, Config
from .._core.keys import KeyLayout
from .._core.problems import ProblemLog
from .._core.view import Changes, ClusterView, ViewState
from .._errors import EtcdError, RevisionCompacted
from .._etcd.client import EtcdClient
from .._etcd.types import EventType, KeyValue
from .cell import Latest

APPLY_SLICE = 2048  # events applied between checkpoints while a burst is being applied


class WatcherActor:
    """Mirrors the cluster prefix into ``views``; ``connected`` tells if the watch is live."""

    def __init__(
        self,
        client: EtcdClient,
        config: Config | ClientConfig,
        layout: KeyLayout,
        views: Latest[ClusterView],
        connected: Latest[bool],
    ) -> None:
        self._client = client
        self._config = config
        self._layout = layout
        shape = (config.partitions, config.replica_factor) if isinstance(config, Config) else None
        self._state = ViewState(layout, shape)
        self.views = views
        self.connected = connected
        self._log = config.log
        self.garbage = 0
        who = f"clusterkit {config.node_id}" if isinstance(config, Config) else "clusterkit client"
        self._problems = ProblemLog(config.log, who)
        self.reloads = 0
        self.reconnects = 0

    def __repr__(self) -> str:
        return (
            f"<WatcherActor rev={self._state.revision} connected={self.connected.value}"
            f" garbage={self.garbage} reloads={self.reloads}>"
        )

    def take_changes(self) -> Changes:
        """What changed in the published views since the last call (one consumer: the
        partition reconciler)."""
        return self._state.take_changes()

    def statistics(self) -> dict[str, int]:
        return {
            "revision": self._state.revision,
            "garbage": self.garbage,
            **self._problems.statistics(),
            "reloads": self.reloads,
            "reconnects": self.reconnects,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the prefix, report ready, then follow it forever."""
        await self._load()
        task_status.started()
        backoff = 0.05
        while True:
            try:
                await self._follow()
            except RevisionCompacted as exc:
                self._log.info("clusterkit watch compacted (%s); re-reading the prefix", exc)
                await self._reload_when_possible()
                continue
            except EtcdError as exc:
                self.connected.set(False)
                self.reconnects += 1
                self._log.warning("clusterkit watch failed: %s; retrying", exc)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _load(self) -> None:
        snapshot = await self._client.get_prefix(self._layout.root)
        self._state.reset()
        for i, kv in enumerate(snapshot.kvs, 1):
            self._apply(kv, deleted=False)
            if i % APPLY_SLICE == 0:
                await trio.lowlevel.checkpoint()  # nothing is published before the end
        self.views.set(self._state.snapshot(snapshot.revision))
        self.connected.set(True)

    async def _reload_when_possible(self) -> None:
        backoff = 0.05
        while True:
            try:
                await self._load()
                self.reloads += 1
                return
            except EtcdError as exc:
                self.connected.set(False)
                self._log.warning("clusterkit: re-reading the prefix failed: %s", exc)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _follow(self) -> None:
        start = self._state.revision + 1
        async with self._client.watch(self._layout.root, prefix=True, start_revision=start) as w:
            if not self.connected.value:
                self.connected.set(True)
            async for first in w:
                # Apply everything that has already arrived, then publish ONE snapshot: under
                # a burst (thousands of leader keys at a cold start) a snapshot per response
                # would cost O(P) each and fall behind the stream.
                revision = 0
                applied = 0
                for batch in (first, *w.take_ready()):
                    # A catch-up response carries the store's *current* revision in its
                    # header, not the revision it caught up to: the view (and the resume
                    # point) is at the last event's revision. Only an empty progress
                    # notification vouches for its header revision.
                    revision = batch.events[-1].kv.mod_revision if batch.events else batch.revision
                    for ev in batch.events:
                        self._apply(ev.kv, deleted=ev.type is EventType.DELETE)
                    applied += len(batch.events)
                    if applied >= APPLY_SLICE:
                        # Let the rest of the node (the keepalive first) run between slices
                        # of a burst; the view is published once, after the last slice.
                        applied = 0
                        await trio.lowlevel.checkpoint()
                self.views.set(self._state.snapshot(revision))

    def _apply(self, kv: KeyValue, *, deleted: bool) -> None:
        problem = self._state.apply_kv(kv, deleted=deleted)
        if problem is not None:
            self.garbage += 1
            parsed = self._layout.parse(kv.key)
            self._problems.report(parsed.kind if parsed is not None else "unknown", problem)
