"""Cluster views: immutable snapshots of what etcd says about the cluster, and their builder.

Theory of operation
-------------------
The watcher feeds every key change under the prefix (``put`` / ``delete`` with the key's
revisions) into a :class:`ViewState`, a mutable mirror of the prefix that knows the key
layout and the record codecs. After each batch of changes it takes a :class:`ClusterView`
snapshot and publishes it; routing reads use whichever snapshot is current, so a read never
waits and never sees a half-applied batch.

A batch of k events costs O(k) to apply and to snapshot: leaders and ready markers live in
copy-on-write chunked maps (:mod:`~clusterkit._core.chunked`), so a snapshot shares every
chunk the batch did not touch with the previous one; the per-partition tuples of
:class:`Node` objects that routing returns are rebuilt only when the map or the node set
changed. Nodes that left but are still named by the map keep their last record (in
``departed``), so ``get_replicas`` can still say who a replica was until the map moves on.

What changed is also accumulated in a :class:`Changes` record (partitions whose leader or
ready markers changed, nodes whose records changed, whether the map changed) that the
partition reconciler takes, so it works on what changed instead of diffing P partitions.
The record is bounded: past ``CHANGES_LIMIT`` partitions it collapses to "everything".

Values that do not decode are *ignored*: the key is treated as absent and the problem is
returned to the caller to log and count. Nothing under the prefix can crash the builder.
The partition map is special: a stored map that is missing, unreadable or of another shape
does not erase the last good one. The view keeps the last good map (``map``), the stored
key's ``mod_revision`` (``map_revision``, so the coordinator's compare-and-swap can
overwrite the bad value) and what is wrong with it (``map_problem``).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Protocol

from .chunked import (
    EMPTY_READY,
    ChunkedMap,
    ChunkedMapBuilder,
    ReadyMarkersBuilder,
)
from .keys import KeyLayout
from .records import MapRecord, Node, RecordError, decode_map, decode_node


class StoredKey(Protocol):
    """A key as etcd stores it (what a range or a watch event carries)."""

    @property
    def key(self) -> bytes: ...
    @property
    def value(self) -> bytes: ...
    @property
    def create_revision(self) -> int: ...
    @property
    def mod_revision(self) -> int: ...
    @property
    def lease(self) -> int: ...


CHANGES_LIMIT = 1 << 16  # touched partitions remembered before collapsing to "everything"


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds a leased key (coordinator, leader): node id and the key's revisions."""

    node_id: str
    create_revision: int
    lease: int = 0


@dataclass(frozen=True)
class ClusterView:
    """An immutable snapshot of the cluster as stored in etcd at ``revision``."""

    revision: int
    nodes: Mapping[str, Node]
    map: MapRecord | None
    map_revision: int
    coordinator: Owner | None
    leaders: Mapping[int, Owner]
    ready: Set[tuple[int, str]]
    departed: Mapping[str, Node] = field(default_factory=dict)
    replica_nodes: tuple[tuple[Node, ...], ...] = ()
    map_problem: str | None = None

    def __repr__(self) -> str:
        version = self.map.version if self.map else None
        return (
            f"<ClusterView rev={self.revision} nodes={sorted(self.nodes)} map_version={version}"
            f" coordinator={self.coordinator.node_id if self.coordinator else None}"
            f" leaders={len(self.leaders)}>"
        )

    def active_node_ids(self) -> frozenset[str]:
        """Registered nodes in state ``active`` (the ones the map should cover)."""
        return frozenset(nid for nid, n in self.nodes.items() if n.state == "active")

    def draining_node_ids(self) -> frozenset[str]:
        """Registered nodes that are leaving with ``drain=True``."""
        return frozenset(nid for nid, n in self.nodes.items() if n.state == "draining")

    def converged(self, replica_factor: int) -> bool:
        """True when the stored map covers exactly the active nodes, fully replicated, with
        no move in flight."""
        active = self.active_node_ids()
        if self.map is None or not active or self.map.pending or self.map_problem:
            return False
        want = min(replica_factor, len(active))
        return self.map.node_ids() == active and all(len(row) == want for row in self.map.replicas)


EMPTY_VIEW = ClusterView(0, {}, None, 0, None, ChunkedMap(), EMPTY_READY)


@dataclass
class Changes:
    """What changed in the views since the last :meth:`ViewState.take_changes`.

    ``everything`` means: treat every partition and node as changed (first load, a reload
    after compaction, or more changes than ``CHANGES_LIMIT``).
    """

    partitions: set[int] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)
    map: bool = False
    everything: bool = False

    def __bool__(self) -> bool:
        return bool(self.partitions or self.nodes or self.map or self.everything)


def _replica_nodes(
    record: MapRecord | None,
    nodes: Mapping[str, Node],
    departed: Mapping[str, Node],
    previous: tuple[MapRecord, tuple[tuple[Node, ...], ...]] | None = None,
) -> tuple[tuple[Node, ...], ...]:
    """Per partition, the replicas as :class:`Node` objects (what routing returns).

    With ``previous`` (the last map and its rows, built from the same node records), rows
    whose ids did not change are reused, so a new map costs a comparison per partition.
    """
    if record is None:
        return ()
    cache: dict[str, Node] = {}

    def node(nid: str) -> Node:
        n = cache.get(nid)
        if n is None:
            n = cache[nid] = nodes.get(nid) or departed.get(nid) or Node(nid, "", state="gone")
        return n

    rows: dict[tuple[str, ...], tuple[Node, ...]] = {}
    old_ids: tuple[tuple[str, ...], ...] = ()
    old_rows: tuple[tuple[Node, ...], ...] = ()
    if previous is not None and previous[0].partitions == record.partitions:
        old_ids, old_rows = previous[0].replicas, previous[1]
    out = []
    for pt, row in enumerate(record.replicas):
        if old_rows and old_ids[pt] == row:
            out.append(old_rows[pt])
            continue
        nodes_row = rows.get(row)
        if nodes_row is None:
            nodes_row = rows[row] = tuple(node(nid) for nid in row)
        out.append(nodes_row)
    return tuple(out)


class ViewState:
    """The mutable mirror of the prefix that :class:`ClusterView` snapshots are cut from.

    Args:
        layout: the key layout of the cluster prefix.
        shape: ``(partitions, replica_factor)`` of this cluster, if known: a stored map of
            another shape is then treated like an unreadable one (the last good map stays).
    """

    def __init__(self, layout: KeyLayout, shape: tuple[int, int] | None = None) -> None:
        self.layout = layout
        self.shape = shape
        self.revision = 0
        self.nodes: dict[str, Node] = {}
        self.departed: dict[str, Node] = {}
        self.map: MapRecord | None = None
        self.map_revision = 0
        self.map_problem: str | None = None
        self.coordinator: Owner | None = None
        self.leaders: ChunkedMapBuilder[Owner] = ChunkedMapBuilder()
        self.ready = ReadyMarkersBuilder()
        # What changed: accumulated in _pending while events are applied, moved to changes
        # (what take_changes hands out) by snapshot(), so a reader never sees changes of a
        # view that is not published yet.
        self.changes = Changes()
        self._pending = Changes(everything=True)
        self._routing_dirty = True
        self._nodes_dirty = True  # node records changed since the last snapshot
        self._last: ClusterView = EMPTY_VIEW

    def reset(self) -> None:
        """Forget everything (before loading a fresh snapshot of the prefix).

        The last good map is kept: a reload must not lose it to a bad stored value.
        """
        self.nodes.clear()
        self.map_revision = 0
        self.map_problem = None
        self.coordinator = None
        self.leaders.clear()
        self.ready.clear()
        self._pending = Changes(everything=True)
        self._routing_dirty = True
        self._nodes_dirty = True

    def take_changes(self) -> Changes:
        """What changed since the last call (the partition reconciler's feed)."""
        changes, self.changes = self.changes, Changes()
        return changes

    def _touch(self, partition: int) -> None:
        changes = self._pending
        if changes.everything:
            return
        changes.partitions.add(partition)
        if len(changes.partitions) > CHANGES_LIMIT:
            self._pending = Changes(everything=True)

    def _publish_changes(self) -> None:
        pending, self._pending = self._pending, Changes()
        changes = self.changes
        if changes.everything or pending.everything:
            self.changes = Changes(everything=True)
            return
        changes.partitions |= pending.partitions
        changes.nodes |= pending.nodes
        changes.map = changes.map or pending.map
        if len(changes.partitions) > CHANGES_LIMIT:
            self.changes = Changes(everything=True)

    def apply_kv(self, kv: StoredKey, *, deleted: bool = False) -> str | None:
        """:meth:`apply` a key as etcd returns it (a range's key, or a watch event's)."""
        return self.apply(
            kv.key,
            None if deleted else kv.value,
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
            lease=kv.lease,
        )

    def apply(
        self,
        key: bytes,
        value: bytes | None,
        *,
        create_revision: int = 0,
        mod_revision: int = 0,
        lease: int = 0,
    ) -> str | None:
        """Apply a put (``value`` given) or a delete (``value is None``) of ``key``.

        Returns:
            ``None``, or a description of why the value was ignored (garbage).
        """
        parsed = self.layout.parse(key)
        if parsed is None:
            return None if value is None else f"unknown key {key!r} under the prefix"
        try:
            match parsed.kind:
                case "secret":
                    pass
                case "cluster":
                    pass
                case "drain":
                    pass  # an operator's drain request: the node's DrainWatcher acts on it
                case "node":
                    self._routing_dirty = True
                    self._nodes_dirty = True
                    if not self._pending.everything:
                        self._pending.nodes.add(parsed.node_id)
                    if value is None:
                        gone = self.nodes.pop(parsed.node_id, None)
                        if gone is not None:
                            self.departed[parsed.node_id] = gone
                    else:
                        self.nodes.pop(parsed.node_id, None)
                        node = decode_node(value, parsed.node_id)
                        if not lease:
                            # clusterkit registers nodes only under a session lease: this key
                            # would never expire, so it is not a member (no map covers it).
                            raise RecordError("node key without a lease: not a member")
                        self.nodes[parsed.node_id] = node
                        self.departed.pop(parsed.node_id, None)
                case "map":
                    return self._apply_map(value, mod_revision)
                case "coordinator":
                    self.coordinator = None
                    if value is not None:
                        self.coordinator = Owner(_owner_id(value), create_revision, lease)
                case "leader":
                    self._touch(parsed.partition)
                    self.leaders.pop(parsed.partition)
                    if value is not None:
                        owner = Owner(_owner_id(value), create_revision, lease)
                        if not lease:
                            # clusterkit writes leader keys only under a session lease: this
                            # one would never expire. Not a leader; campaigns remove it.
                            raise RecordError("leader key without a lease: not a leader")
                        self.leaders.set(parsed.partition, owner)
                case "ready":
                    self._touch(parsed.partition)
                    if value is None:
                        self.ready.discard(parsed.partition, parsed.node_id)
                    else:
                        self.ready.add(parsed.partition, parsed.node_id)
        except RecordError as exc:
            return f"{key.decode(errors='replace')}: {exc}"
        return None

    def _apply_map(self, value: bytes | None, mod_revision: int) -> str | None:
        """A put or delete of ``P/map``: keep the last good map when the new value is bad."""
        self.map_revision = 0 if value is None else mod_revision
        if value is None:
            if self.map is None:
                self.map_problem = None
                return None
            self.map_problem = "the stored map was deleted"
            return (
                f"{self.layout.map.decode()}: {self.map_problem}; keeping map v{self.map.version}"
            )
        try:
            record = decode_map(value)
            if self.shape is not None and (record.partitions, record.replica_factor) != self.shape:
                raise RecordError(
                    f"map of another cluster shape (partitions={record.partitions}, "
                    f"replica_factor={record.replica_factor}; expected {self.shape})"
                )
        except RecordError as exc:
            self.map_problem = str(exc)
            kept = f"keeping map v{self.map.version}" if self.map else "no map yet"
            return f"{self.layout.map.decode()}: {exc}; {kept}"
        if self.map is not None and record.version <= self.map.version and record != self.map:
            self.map_problem = (
                f"the stored map v{record.version} is not newer than v{self.map.version}"
            )
            return f"{self.layout.map.decode()}: {self.map_problem}; keeping the newer one"
        self.map_problem = None
        if record != self.map:
            self.map = record
            self._routing_dirty = True
            self._pending.map = True
        return None

    def snapshot(self, revision: int) -> ClusterView:
        """An immutable view of the current state at ``revision``."""
        self.revision = max(self.revision, revision)
        self._publish_changes()
        if self._routing_dirty:
            if self.departed:
                named = self.map.node_ids() if self.map is not None else frozenset()
                for nid in [n for n in self.departed if n not in named]:
                    del self.departed[nid]
                    self._nodes_dirty = True
            last = self._last
            previous = None
            if not self._nodes_dirty and last.map is not None:
                previous = (last.map, last.replica_nodes)
            replica_nodes = _replica_nodes(self.map, self.nodes, self.departed, previous)
            if self._nodes_dirty:
                nodes: Mapping[str, Node] = dict(self.nodes)
                departed: Mapping[str, Node] = dict(self.departed)
            else:
                nodes, departed = last.nodes, last.departed
            self._routing_dirty = self._nodes_dirty = False
        else:
            replica_nodes = self._last.replica_nodes
            nodes, departed = self._last.nodes, self._last.departed
        self._last = ClusterView(
            revision=self.revision,
            nodes=nodes,
            map=self.map,
            map_revision=self.map_revision,
            coordinator=self.coordinator,
            leaders=self.leaders.freeze(),
            ready=self.ready.freeze(),
            departed=departed,
            replica_nodes=replica_nodes,
            map_problem=self.map_problem,
        )
        return self._last


def _owner_id(value: bytes) -> str:
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise RecordError("owner value is not UTF-8") from None
    if not text:
        raise RecordError("owner value is empty")
    return text
