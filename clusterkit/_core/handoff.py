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

Ready markers of nodes that are no longer in a partition (neither committed nor pending)
are returned for deletion in the same write.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .assignment import assign
from .records import MapRecord


@dataclass(frozen=True, slots=True)
class Plan:
    """What the coordinator should write: the next map, and ready markers to delete."""

    record: MapRecord
    stale_ready: tuple[tuple[int, str], ...]
    committed: tuple[int, ...]

    def changed(self, previous: MapRecord | None) -> bool:
        """True when the plan differs from ``previous`` (version aside)."""
        return previous is None or (
            self.record.replicas != previous.replicas or self.record.pending != previous.pending
        )


def plan(
    previous: MapRecord | None,
    active: Collection[str],
    draining: Collection[str],
    ready: Collection[tuple[int, str]],
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
    ready_set = frozenset(ready)
    committed_rows: list[tuple[str, ...]]
    intended: dict[int, Sequence[str]]
    if previous is None:
        committed_rows = [() for _ in range(partitions)]
        intended = {}
    else:
        committed_rows = [tuple(n for n in row if n in alive) for row in previous.replicas]
        intended = {
            pt: tuple(n for n in previous.pending.get(pt, row) if n in alive)
            for pt, row in enumerate(previous.replicas)
        }
    target = assign(intended, placeable, partitions, replica_factor)

    def announced(pt: int) -> tuple[str, ...]:
        # A ready marker counts only for a move the stored map already announced: a marker
        # left from an earlier, abandoned move must not commit a new one before its hook ran.
        return previous.pending.get(pt, ()) if previous is not None else ()

    replicas: list[tuple[str, ...]] = []
    pending: dict[int, tuple[str, ...]] = {}
    committed: list[int] = []
    for pt in range(partitions):
        current, goal = committed_rows[pt], target[pt]
        joining = [n for n in goal if n not in current]
        if goal == current:
            replicas.append(current)
        elif not current or all((pt, n) in ready_set and n in announced(pt) for n in joining):
            replicas.append(goal)
            if joining:
                committed.append(pt)
        else:
            replicas.append(current)
            pending[pt] = goal
    version = previous.version + 1 if previous is not None else 1
    record = MapRecord(version, partitions, replica_factor, tuple(replicas), pending)
    return Plan(record, _stale(record, ready_set), tuple(committed))


def _stale(record: MapRecord, ready: frozenset[tuple[int, str]]) -> tuple[tuple[int, str], ...]:
    """Ready markers of nodes that are neither committed nor pending in their partition.

    Markers of replicas stay: a committed preferred replica uses its marker to say it is
    ready to take leadership back.
    """
    return tuple(
        sorted(
            (pt, n)
            for pt, n in ready
            if not 0 <= pt < record.partitions
            or (n not in record.replicas[pt] and n not in record.pending.get(pt, ()))
        )
    )


def commit_ready(
    previous: MapRecord, active: Collection[str], ready: Collection[tuple[int, str]]
) -> Plan | None:
    """Commit the pending rows whose joining nodes are all ready, without re-planning.

    Cheap (no assignment run): what the coordinator does on every ready marker while the
    membership is settled. Returns None when nothing can be committed.
    """
    alive = frozenset(active)
    ready_set = frozenset(ready)
    replicas = list(previous.replicas)
    pending = dict(previous.pending)
    committed: list[int] = []
    for pt, goal in previous.pending.items():
        if any(n not in alive for n in goal):
            continue  # a planned replica died: leave it to the next full plan
        current = tuple(n for n in previous.replicas[pt] if n in alive)
        if not current or all((pt, n) in ready_set for n in goal if n not in current):
            replicas[pt] = goal
            del pending[pt]
            committed.append(pt)
    if not committed:
        return None
    record = MapRecord(
        previous.version + 1,
        previous.partitions,
        previous.replica_factor,
        tuple(replicas),
        pending,
    )
    return Plan(record, _stale(record, ready_set), tuple(sorted(committed)))


def joining(record: MapRecord, partition: int) -> tuple[str, ...]:
    """The nodes of ``partition``'s pending row that are not committed replicas yet."""
    row = record.pending.get(partition)
    if row is None:
        return ()
    current = record.replicas[partition]
    return tuple(n for n in row if n not in current)
