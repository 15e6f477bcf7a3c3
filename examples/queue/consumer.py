"""Producers and consumer groups of the queue.

A **producer** sends batches to a partition's leader through a routing client
(``request(None, "queue.produce", ..., partition=pt)``) and retries until acknowledged; each
message carries the producer's id and a sequence number.

A **consumer group** reuses clusterkit's own assignment: its members are the nodes of a small
clusterkit cluster of their own (prefix ``<queue prefix>-groups/<group>``, the queue's
partition count, one replica), so clusterkit spreads the queue's partitions over the members,
moves them when a member joins or dies (after its session TTL), and elects one member per
partition with a fencing epoch. A member consumes exactly the partitions it *leads* in its
group's cluster (a task started by ``on_leader_elected``, cancelled by ``on_leader_lost``),
inside ``ck.leadership(pt)``: it reads the group's committed position from the
queue, fetches records after it from the queue partition's leader, hands them to the handler in
offset order, and commits the position after each batch. A member that dies stops committing;
the member that takes the partition over resumes from the last committed position, so the
records after it are delivered again (at-least-once).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

import clusterkit

from .log import Record

Handler = Callable[[int, Record, int], Awaitable[None]]
"""``handler(partition, record, run)``: ``run`` numbers a member's consecutive leads of a
partition (a new run starts again from the committed position)."""
FETCH_BATCH = 500
IDLE_POLL = 0.05


def partition_of(routing: clusterkit.RoutingClient, topic: str, key: bytes) -> int:
    """The partition of ``key`` in ``topic``: clusterkit's hash of ``topic/key``."""
    return routing.get_partition(topic.encode() + b"/" + key)


async def produce(
    routing: clusterkit.RoutingClient,
    partition: int,
    topic: str,
    messages: list[tuple[bytes, bytes, str, int]],
    *,
    timeout: float = 60.0,
) -> int:
    """Append ``[(key, value, producer, seq), ...]`` to ``partition``; its first offset once
    every live replica has the batch (retried, so it may be appended twice)."""
    with trio.fail_after(timeout):
        while True:
            try:
                answer = await routing.request(
                    None,
                    "queue.produce",
                    {"p": partition, "t": topic, "m": [list(m) for m in messages]},
                    partition=partition,
                    timeout=10,
                )
                return int(answer["offset"])
            except clusterkit.ClusterKitError:
                await trio.sleep(0.05)  # no leader yet, a replica lagging: try again


class GroupMember:
    """One member of consumer group ``group`` of ``topic`` (see the module docstring)."""

    def __init__(
        self,
        member_id: str,
        group: str,
        topic: str,
        routing: clusterkit.RoutingClient,
        *,
        etcd_endpoints: list[str],
        queue_prefix: str,
        partitions: int,
        handler: Handler,
        session_ttl: float = 2.0,
    ) -> None:
        self.member_id = member_id
        self.group = group
        self.topic = topic
        self.routing = routing
        self.handler = handler
        self.consumed = 0
        self.runs = 0
        self._ck: clusterkit.ClusterKit | None = None
        self._nursery: trio.Nursery | None = None
        self._leads: dict[int, trio.CancelScope] = {}
        self.config = clusterkit.Config(
            node_id=member_id,
            etcd_endpoints=etcd_endpoints,
            etcd_prefix=f"{queue_prefix}-groups/{group}",
            partitions=partitions,
            replica_factor=1,
            http_port=0,
            grpc_server=False,
            grpc_port=0,
            metrics_port=None,
            session_ttl=session_ttl,
            rebalance_delay=0.5,
            on_leader_elected=self._elected,
            on_leader_lost=self._lost,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with clusterkit.open_cluster(self.config, setup=self._attach):
                task_status.started()
                await trio.sleep_forever()

    def _attach(self, ck: clusterkit.ClusterKit) -> None:
        self._ck = ck

    # The hooks: a consuming task exists only for a partition this member leads.
    async def _elected(self, pt: int) -> None:
        assert self._nursery is not None
        scope = self._leads[pt] = trio.CancelScope()
        self._nursery.start_soon(self._lead, pt, scope)

    async def _lost(self, pt: int) -> None:
        scope = self._leads.pop(pt, None)
        if scope is not None:
            scope.cancel()

    async def _lead(self, pt: int, scope: trio.CancelScope) -> None:
        assert self._ck is not None
        with scope:
            try:
                async with self._ck.leadership(pt):
                    await self._consume(pt)
            except clusterkit.NotLeader:
                pass  # lost it already: its next leader resumes from the committed position

    async def _consume(self, pt: int) -> None:
        call = self._call
        self.runs += 1
        run = self.runs
        position: int = await call(pt, "queue.position", {"p": pt, "g": self.group})
        while True:
            answer = await call(
                pt, "queue.fetch", {"p": pt, "t": self.topic, "o": position, "n": FETCH_BATCH}
            )
            for wire in answer["records"]:
                await self.handler(pt, Record(*wire), run)
                self.consumed += 1
            position = max(position, answer["next"])
            if answer["records"]:  # (positions alone, past commit records, need no commit)
                await call(pt, "queue.commit", {"p": pt, "g": self.group, "o": position})
            else:
                await trio.sleep(IDLE_POLL)

    async def _call(self, pt: int, method: str, payload: dict[str, Any]) -> Any:
        while True:
            try:
                return await self.routing.request(None, method, payload, partition=pt, timeout=10)
            except clusterkit.ClusterKitError:
                await trio.sleep(0.05)
