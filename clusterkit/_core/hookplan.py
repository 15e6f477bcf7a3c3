"""Which hooks a node must run, per partition, as the map changes (pure).

Theory of operation
-------------------
For every partition a node has a *role* in the stored map: none, *joining* (in the pending
row, not committed: it must pull the data), or *replica* (committed). The hooks actor keeps a
:class:`Track` per partition and, on every new view, asks :func:`transition` for the calls
that move the track to the new role. The calls respect the per-partition grammar

    assigned -> (leader_elected -> leader_lost)* -> unassigned

with ``replica_added`` / ``replica_removed`` telling a committed replica about its peers in
between. Leadership calls come from the leader actors, through :func:`leadership`, which
refuses an ``elected`` before ``assigned`` has completed or a second ``elected`` in a row.

The calls are data (:class:`HookCall`); running them, retrying, and writing ready markers is
the actor's job.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from .records import MapRecord


class Role(enum.Enum):
    """A node's part in one partition."""

    NONE = "none"
    JOINING = "joining"
    REPLICA = "replica"


def role_of(record: MapRecord | None, partition: int, node_id: str) -> Role:
    """This node's role in ``partition`` according to ``record``."""
    if record is None or not 0 <= partition < len(record.replicas):
        return Role.NONE
    if node_id in record.replicas[partition]:
        return Role.REPLICA
    if node_id in record.pending.get(partition, ()):
        return Role.JOINING
    return Role.NONE


@dataclass(frozen=True, slots=True)
class HookCall:
    """One hook to run: its name (``"assigned"``, ...) and its node argument, if any."""

    hook: str
    partition: int
    node: str | None = None


@dataclass(frozen=True)
class Track:
    """What the app has been told about one partition so far."""

    role: Role = Role.NONE
    assigned: bool = False  # on_partition_assigned was scheduled (it may still be running)
    leading: bool = False  # on_leader_elected was scheduled without a matching lost
    peers: tuple[str, ...] = field(default=())


def transition(
    track: Track,
    role: Role,
    peers: Sequence[str],
    *,
    partition: int,
    previous_owner: str | None,
    new_owner: str | None,
) -> tuple[Track, list[HookCall]]:
    """The calls that bring ``track`` to ``role`` with the committed ``peers``.

    Args:
        track: what the app has been told so far.
        role: the node's new role.
        peers: the partition's committed replicas other than this node, in order.
        partition: the partition.
        previous_owner: who to pull from when assigned (the leader, or a live committed
            replica), None when no replica survives.
        new_owner: who takes over when unassigned.
    """
    calls: list[HookCall] = []
    peers_t = tuple(peers)
    if track.role is Role.REPLICA and role is Role.JOINING:
        # Demoted from replica to joining (e.g. it was cut off and the partition moved on
        # without it): its data is stale, so it is unassigned and must pull again.
        track, calls = transition(
            track, Role.NONE, (), partition=partition, previous_owner=None, new_owner=new_owner
        )
    if role is Role.NONE:
        if track.leading:
            calls.append(HookCall("leader_lost", partition))
        if track.assigned:
            calls.append(HookCall("unassigned", partition, new_owner))
        return Track(), calls
    if not track.assigned:
        calls.append(HookCall("assigned", partition, previous_owner))
        track = replace(track, assigned=True, peers=peers_t if role is Role.REPLICA else ())
    if role is Role.REPLICA:
        old = track.peers if track.role is Role.REPLICA else peers_t
        for node in old:
            if node not in peers_t:
                calls.append(HookCall("replica_removed", partition, node))
        for node in peers_t:
            if node not in old:
                calls.append(HookCall("replica_added", partition, node))
        return replace(track, role=role, peers=peers_t), calls
    return replace(track, role=role), calls


def leadership(track: Track, elected: bool, partition: int) -> tuple[Track, list[HookCall]]:
    """The calls for a leadership change reported by the leader actor (grammar-checked)."""
    if elected and track.assigned and not track.leading and track.role is Role.REPLICA:
        return replace(track, leading=True), [HookCall("leader_elected", partition)]
    if not elected and track.leading:
        return replace(track, leading=False), [HookCall("leader_lost", partition)]
    return track, []
