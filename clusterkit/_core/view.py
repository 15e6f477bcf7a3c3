"""Cluster views: immutable snapshots of what etcd says about the cluster, and their builder.

Theory of operation
-------------------
The watcher feeds every key change under the prefix (``put`` / ``delete`` with the key's
revisions) into a :class:`ViewState`, a mutable mirror of the prefix that knows the key
layout and the record codecs. After each batch of changes it takes a :class:`ClusterView`
snapshot and publishes it; routing reads use whichever snapshot is current, so a read never
waits and never sees a half-applied batch.

A snapshot is cheap when only leaders or ready markers changed: the per-partition tuples of
:class:`Node` objects that routing returns are rebuilt only when the map or the node set
changed. Nodes that left but are still named by the map keep their last record (in
``departed``), so ``get_replicas`` can still say who a replica was until the map moves on.

Values that do not decode are *ignored*: the key is treated as absent and the problem is
returned to the caller to log and count. Nothing under the prefix can crash the builder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .keys import KeyLayout
from .records import MapRecord, Node, RecordError, decode_map, decode_node


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
    ready: frozenset[tuple[int, str]]
    departed: Mapping[str, Node] = field(default_factory=dict)
    replica_nodes: tuple[tuple[Node, ...], ...] = ()

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
        if self.map is None or not active or self.map.pending:
            return False
        want = min(replica_factor, len(active))
        return self.map.node_ids() == active and all(len(row) == want for row in self.map.replicas)


EMPTY_VIEW = ClusterView(0, {}, None, 0, None, {}, frozenset())


def _replica_nodes(
    record: MapRecord | None, nodes: Mapping[str, Node], departed: Mapping[str, Node]
) -> tuple[tuple[Node, ...], ...]:
    if record is None:
        return ()
    cache: dict[str, Node] = {}

    def node(nid: str) -> Node:
        n = cache.get(nid)
        if n is None:
            n = cache[nid] = nodes.get(nid) or departed.get(nid) or Node(nid, "", state="gone")
        return n

    return tuple(tuple(node(nid) for nid in row) for row in record.replicas)


class ViewState:
    """The mutable mirror of the prefix that :class:`ClusterView` snapshots are cut from."""

    def __init__(self, layout: KeyLayout) -> None:
        self.layout = layout
        self.revision = 0
        self.nodes: dict[str, Node] = {}
        self.departed: dict[str, Node] = {}
        self.map: MapRecord | None = None
        self.map_revision = 0
        self.coordinator: Owner | None = None
        self.leaders: dict[int, Owner] = {}
        self.ready: set[tuple[int, str]] = set()
        self._routing_dirty = True
        self._last: ClusterView = EMPTY_VIEW

    def reset(self) -> None:
        """Forget everything (before loading a fresh snapshot of the prefix)."""
        self.nodes.clear()
        self.map = None
        self.map_revision = 0
        self.coordinator = None
        self.leaders.clear()
        self.ready.clear()
        self._routing_dirty = True

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
                case "node":
                    self._routing_dirty = True
                    if value is None:
                        gone = self.nodes.pop(parsed.node_id, None)
                        if gone is not None:
                            self.departed[parsed.node_id] = gone
                    else:
                        self.nodes.pop(parsed.node_id, None)
                        self.nodes[parsed.node_id] = decode_node(value, parsed.node_id)
                        self.departed.pop(parsed.node_id, None)
                case "map":
                    self._routing_dirty = True
                    # A garbage map keeps its revision, so the coordinator can overwrite it.
                    self.map, self.map_revision = None, (0 if value is None else mod_revision)
                    if value is not None:
                        self.map = decode_map(value)
                case "coordinator":
                    self.coordinator = None
                    if value is not None:
                        self.coordinator = Owner(_owner_id(value), create_revision, lease)
                case "leader":
                    self.leaders.pop(parsed.partition, None)
                    if value is not None:
                        owner = Owner(_owner_id(value), create_revision, lease)
                        self.leaders[parsed.partition] = owner
                case "ready":
                    marker = (parsed.partition, parsed.node_id)
                    if value is None:
                        self.ready.discard(marker)
                    else:
                        self.ready.add(marker)
        except RecordError as exc:
            return f"{key.decode(errors='replace')}: {exc}"
        return None

    def snapshot(self, revision: int) -> ClusterView:
        """An immutable view of the current state at ``revision``."""
        self.revision = max(self.revision, revision)
        if self._routing_dirty:
            if self.map is not None:
                named = self.map.node_ids()
                for nid in [n for n in self.departed if n not in named]:
                    del self.departed[nid]
            else:
                self.departed.clear()
            replica_nodes = _replica_nodes(self.map, self.nodes, self.departed)
            nodes: Mapping[str, Node] = dict(self.nodes)
            departed: Mapping[str, Node] = dict(self.departed)
            self._routing_dirty = False
        else:
            replica_nodes = self._last.replica_nodes
            nodes, departed = self._last.nodes, self._last.departed
        self._last = ClusterView(
            revision=self.revision,
            nodes=nodes,
            map=self.map,
            map_revision=self.map_revision,
            coordinator=self.coordinator,
            leaders=dict(self.leaders),
            ready=frozenset(self.ready),
            departed=departed,
            replica_nodes=replica_nodes,
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
