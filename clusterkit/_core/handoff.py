"""Two-phase handoff: how the coordinator moves replicas without ever losing the data.

Theory of operation
-------------------
The stored map has, per partition, the *committed* replicas (they hold the data and serve)
and, while a move is in flight, a *pending* row: the replicas the partition is moving to.
The nodes in the pending row that are not committed are *joining*: each runs its
``on_partition_assigned`` hook (pulling data from the current leader) and then writes the
ready marker ``P/ready/<pt>/<node>``. Only when every joining node of a partition is ready
does the coordinator commit the pending row; the replicas that are not in it then get
``on_partition_unassigned``. Make before break: a partition never has fewer ready replicas
during a planned move than before it.

:func:`plan` is the coordinator's whole decision, as a pure function of what it reads:

1. Committed replicas on nodes that are gone (session expired) are dropped at once: their
   data is gone with them, waiting would only block the partition.
2. The target is ``assign(intended, placeable, P, R)``: ``intended`` is each partition's
   pending row if it has one, else its committed row, so moves already in flight are not
   re-planned; ``placeable`` are the active nodes that are not draining. Draining nodes keep
   serving (they stay committed) until their replacements are ready.
3. Per partition: a target equal to the committed row needs nothing; a target that only
   removes or reorders replicas, or whose joining nodes are all ready, or whose committed
   replicas are all gone (nobody to copy from: the new replicas start empty, with
   ``previous_owner=None``) is committed at once; otherwise it becomes (or stays) pending.

:func:`commit_ready` is the cheap step between plans: it commits the pending rows whose
joining nodes are all ready, in O(pending rows), without running the assignment.
:class:`ReadyTracker` tells the coordinator, at O(1) amortized per view, when *every*
announced joining replica is ready (then it commits at once); partial commits are paced by
``debounce.CommitPacer``, so a join costs a handful of maps, not one per ready marker.

Ready markers and their deletion
--------------------------------
A marker counts only for a move the stored map announced, so a marker left from an earlier,
abandoned move cannot commit a new one before its hook ran. That holds as long as a marker
``(pt, n)`` that the stored map does not account for (``n`` neither committed nor pending
in ``pt``) is gone before a map that announces ``n`` for ``pt`` is stored. A plan therefore
names two sets: ``stale_ready``, every marker the new map no longer accounts for (deleted
in the map's Txn, or after it: they are harmless until a later map re-announces the move),
and ``delete_first``, the markers the new map announces but the stored one did not account
for: they go in the map's Txn or in Txns before it. etcd refuses Txns of more than
``--max-txn-ops`` operations (128 by default), so :func:`delete_batches` splits the
deletions: ``delete_first`` before or with the map, the rest with it or after it. A
coordinator that dies between those Txns leaves markers the stored map does not account
for, which the next plan's ``delete_first`` catches.

``delete_first`` also catches a node that lags: one that wrote a marker under an older map
(say, as a rejoined committed replica) which the stored map no longer gives it, when the
next map announces it as joining there. Its marker predates its pull for that move, so it
must not count; the partition actor writes the marker again once it is ready under the map
it sees (it re-pulls first when it was demoted), and that marker counts.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence, Set
from dataclasses import dataclass

from .assignment import assign
from .records import MapRecord

Marker = tuple[int, str]


@dataclass(frozen=True, slots=True)
class Plan:
    """What the coordinator should write: the next map, and ready markers to delete.

    Attributes:
        record: the next map.
        stale_ready: markers to delete (sorted); includes ``delete_first``.
        committed: partitions whose pending row this map commits.
        delete_first: markers that must be gone no later than the map's own Txn.
    """

    record: MapRecord
    stale_ready: tuple[Marker, ...]
    committed: tuple[int, ...]
    delete_first: tuple[Marker, ...] = ()

    def changed(self, previous: MapRecord | None) -> bool:
        """True when the plan differs from ``previous`` (version aside)."""
        return previous is None or (
            self.record.replicas != previous.replicas or self.record.pending != previous.pending
        )


def _as_set(ready: Collection[Marker]) -> Set[Marker]:
    return ready if isinstance(ready, Set) else frozenset(ready)


def plan(
    previous: MapRecord | None,
    active: Collection[str],
    draining: Collection[str],
    ready: Collection[Marker],
    partitions: int,
    replica_factor: int,
) -> Plan:
    """Compute the next stored map (see the module docstring).

    Args:
        previous: the stored map, or None on a cold start.
        active: ids of the registered nodes (including draining ones).
        draining: ids of registered nodes that are leaving with ``drain=True``.
        ready: the ready markers ``(partition, node_id)`` present in etcd.
        partitions: P.
        replica_factor: R.
    """
    alive = frozenset(active)
    placeable = sorted(alive - frozenset(draining))
    ready_set = _as_set(ready)
    committed_rows: list[tuple[str, ...]]
    intended: dict[int, Sequence[str]]
    if previous is None:
        committed_rows = [() for _ in range(partitions)]
        intended = {}
    else:
        committed_rows = [
            row if alive.issuperset(row) else tuple(n for n in row if n in alive)
            for row in previous.replicas
        ]
        pending = previous.pending
        intended = {
            pt: row if alive.issuperset(row) else tuple(n for n in row if n in alive)
            for pt, row in enumerate(previous.replicas)
        }
        for pt, row in pending.items():
            intended[pt] = tuple(n for n in row if n in alive)
    target = assign(intended, placeable, partitions, replica_factor)

    def announced(pt: int) -> tuple[str, ...]:
        # A ready marker counts only for a move the stored map already announced: a marker
        # left from an earlier, abandoned move must not commit a new one before its hook ran.
        return previous.pending.get(pt, ()) if previous is not None else ()

    replicas: list[tuple[str, ...]] = []
    pending_rows: dict[int, tuple[str, ...]] = {}
    committed: list[int] = []
    for pt in range(partitions):
        current, goal = committed_rows[pt], target[pt]
        if goal == current:
            replicas.append(current)
            continue
        joining = [n for n in goal if n not in current]
        if not current or all((pt, n) in ready_set and n in announced(pt) for n in joining):
            replicas.append(goal)
            if joining:
                committed.append(pt)
        else:
            replicas.append(current)
            pending_rows[pt] = goal
    version = previous.version + 1 if previous is not None else 1
    record = MapRecord(version, partitions, replica_factor, tuple(replicas), pending_rows)
    stale = _unaccounted(record, ready_set)
    # Markers the stored map does not account for, of nodes this map announces: they
    # must be gone before (or with) this map, or they would count for the new move.
    unknown = _unaccounted(previous, ready_set) if previous is not None else []
    first = tuple((pt, n) for pt, n in unknown if n in record.pending.get(pt, ()))
    return Plan(record, tuple(sorted({*stale, *first})), tuple(committed), first)


def _unaccounted(record: MapRecord, ready: Collection[Marker]) -> list[Marker]:
    """Ready markers of nodes that are neither committed nor pending in their partition.

    Markers of replicas stay: a committed preferred replica uses its marker to say it is
    ready to take leadership back.
    """
    replicas, pending, p = record.replicas, record.pending, record.partitions
    return sorted(
        (pt, n)
        for pt, n in ready
        if not 0 <= pt < p or (n not in replicas[pt] and n not in pending.get(pt, ()))
    )


def commit_ready(
    previous: MapRecord, active: Collection[str], ready: Collection[Marker]
) -> Plan | None:
    """Commit the pending rows whose joining nodes are all ready, without re-planning.

    Cheap (no assignment run, O(pending rows)): what the coordinator does while the
    membership is settled. The markers of replicas that leave their partition are returned
    as stale. Returns None when nothing can be committed.
    """
    alive = active if isinstance(active, frozenset) else frozenset(active)
    ready_set = _as_set(ready)
    replicas = list(previous.replicas)
    pending = dict(previous.pending)
    committed: list[int] = []
    stale: list[Marker] = []
    for pt, goal in previous.pending.items():
        if not alive.issuperset(goal):
            continue  # a planned replica died: leave it to the next full plan
        old = previous.replicas[pt]
        current = [n for n in old if n in alive]
        if not current or all((pt, n) in ready_set for n in goal if n not in current):
            replicas[pt] = goal
            del pending[pt]
            committed.append(pt)
            stale.extend((pt, n) for n in old if n not in goal and (pt, n) in ready_set)
    if not committed:
        return None
    record = MapRecord(
        previous.version + 1,
        previous.partitions,
        previous.replica_factor,
        tuple(replicas),
        pending,
    )
    return Plan(record, tuple(sorted(stale)), tuple(sorted(committed)))


def delete_batches(
    step: Plan, max_ops: int
) -> tuple[list[list[Marker]], list[Marker], list[list[Marker]]]:
    """Split a plan's marker deletions into Txns of at most ``max_ops`` operations.

    Returns:
        ``(before, with_map, after)``: Txns of deletions to run before the map's Txn, the
        deletions that go in the map's Txn (next to its put), and Txns to run after it.
        ``delete_first`` markers are never after the map.
    """
    room = max_ops - 1  # the map's put is one operation
    first = list(step.delete_first)
    firsts = set(first)
    rest = [m for m in step.stale_ready if m not in firsts]
    before: list[list[Marker]] = []
    while len(first) > room:
        before.append(first[:max_ops])
        first = first[max_ops:]
    take = room - len(first)
    with_map = first + rest[:take]
    rest = rest[take:]
    after = [rest[i : i + max_ops] for i in range(0, len(rest), max_ops)]
    return before, with_map, after


def joining(record: MapRecord, partition: int) -> tuple[str, ...]:
    """The nodes of ``partition``'s pending row that are not committed replicas yet."""
    row = record.pending.get(partition)
    if row is None:
        return ()
    current = record.replicas[partition]
    return tuple(n for n in row if n not in current)


class ReadyTracker:
    """Tells when every joining replica a map announced has its ready marker.

    One tracker per stored map: it walks the announced ``(partition, node)`` pairs in order
    and remembers how far every pair was ready, so checking a new view costs O(1) amortized
    (O(pairs) over the map's whole life). A marker that disappears after the cursor passed
    it is caught by :func:`commit_ready`, which always checks the current markers; call
    :meth:`rewind` when that happened.
    """

    __slots__ = ("_cursor", "_need", "record")

    def __init__(self, record: MapRecord) -> None:
        self.record = record
        self._need: list[Marker] = [
            (pt, n) for pt in sorted(record.pending) for n in joining(record, pt)
        ]
        self._cursor = 0

    def __repr__(self) -> str:
        return f"<ReadyTracker v{self.record.version} {self._cursor}/{len(self._need)}>"

    @property
    def announced(self) -> int:
        """How many joining replicas the map announced."""
        return len(self._need)

    def all_ready(self, ready: Collection[Marker]) -> bool:
        """True when every announced joining replica is (or was) ready."""
        need, i = self._need, self._cursor
        while i < len(need) and need[i] in ready:
            i += 1
        self._cursor = i
        return i == len(need)

    def rewind(self) -> None:
        """Check every pair again on the next call (a marker went away)."""
        self._cursor = 0


@dataclass(frozen=True, slots=True)
class MapSummary:
    """What ``covers`` needs of a map, computed once per map in O(P).

    Attributes:
        record: the map.
        committed_nodes: nodes with a committed replica.
        intended_nodes: nodes of the rows the map moves to (pending row, else committed).
        intended_sizes: the distinct lengths of those rows.
    """

    record: MapRecord
    committed_nodes: frozenset[str]
    intended_nodes: frozenset[str]
    intended_sizes: frozenset[int]

    @classmethod
    def of(cls, record: MapRecord) -> MapSummary:
        intended = list(record.replicas)
        for pt, row in record.pending.items():
            intended[pt] = row
        return cls(
            record,
            frozenset().union(*record.replicas),
            frozenset().union(*intended),
            frozenset(map(len, intended)),
        )

    def covers(
        self,
        placeable: frozenset[str],
        alive: Collection[str],
        draining: frozenset[str],
        replica_factor: int,
    ) -> bool:
        """True when the map already plans for exactly ``placeable`` (nothing to re-plan).

        O(nodes): every partition moves to min(R, N) placeable nodes, no committed replica
        is dead, every placeable node holds something and every other node named is
        draining.
        """
        if not placeable:
            return True
        want = min(replica_factor, len(placeable))
        named = self.record.node_ids()
        return (
            self.intended_sizes == {want}
            and self.intended_nodes <= placeable
            and all(n in alive for n in self.committed_nodes)
            and named - placeable <= draining
            and placeable <= named
        )
