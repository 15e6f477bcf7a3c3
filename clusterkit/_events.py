"""The events a node reports to its app, as hooks and as ``ck.events()``.

Each event is a frozen dataclass; an app can ``match`` on the class. For one partition they
come in the order ``PartitionAssigned -> (LeaderElected -> LeaderLost)* ->
PartitionUnassigned``, with ``ReplicaAdded`` / ``ReplicaRemoved`` in between.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._core.records import Node


@dataclass(frozen=True, slots=True)
class PartitionAssigned:
    """This node became a replica of ``partition``; pull its data from ``previous_owner``
    (the current leader; None when no replica survived).

    ``resync`` is True when the node already held the partition but lost its session and
    rejoined: the others may have taken writes meanwhile, so pull again (and merge).
    """

    partition: int
    previous_owner: Node | None
    resync: bool = False


@dataclass(frozen=True, slots=True)
class PartitionUnassigned:
    """This node is no longer a replica of ``partition``; ``new_owner`` serves it now."""

    partition: int
    new_owner: Node | None


@dataclass(frozen=True, slots=True)
class LeaderElected:
    """This node leads ``partition`` with fencing ``epoch`` (strictly increasing)."""

    partition: int
    epoch: int


@dataclass(frozen=True, slots=True)
class LeaderLost:
    """This node stopped leading ``partition`` (epoch ``epoch`` is over)."""

    partition: int
    epoch: int


@dataclass(frozen=True, slots=True)
class ReplicaAdded:
    """``node`` became a fellow replica of ``partition``."""

    partition: int
    node: Node


@dataclass(frozen=True, slots=True)
class ReplicaRemoved:
    """``node`` is no longer a fellow replica of ``partition``."""

    partition: int
    node: Node


ClusterEvent = (
    PartitionAssigned
    | PartitionUnassigned
    | LeaderElected
    | LeaderLost
    | ReplicaAdded
    | ReplicaRemoved
)
