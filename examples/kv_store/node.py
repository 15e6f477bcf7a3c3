"""One node of the replicated KV store: ``python -m examples.kv_store.node --id n1 --etcd ...``.

Theory of operation
-------------------
clusterkit decides who holds and who leads each partition; this module moves the data.

* Writes (``kv.put``, ``kv.delete``) go to the partition's leader (the routing client finds
  it). The leader stamps the write with ``(epoch, seq)`` (``store.py``), applies it locally,
  replicates it *synchronously* to every other replica of the partition — committed ones,
  joining ones (pending in the map) and nodes that are pulling the partition from it right
  now — and only then acknowledges. Any replica that is alive (registered) but does not
  answer fails the write; the client retries, and after the session TTL a dead node is no
  longer registered and no longer waited for. So an acknowledged write is on every live
  replica, and any replica that can become leader has it.
* The leader works inside ``ck.leadership(pt)``: the block is cancelled before the lease
  can expire, so a paused leader never acknowledges after a successor may exist. Replicas
  refuse writes whose epoch is older than the newest they know (``max_epoch`` or the leader
  epoch in their own view): a stale leader cannot overwrite a newer one.
* A node that becomes a replica pulls the partition in ``on_partition_assigned`` through
  ``ck.migration.pull`` from the leader (whose migration source registers the puller, so
  every write from then on is also replicated to it). Versions make the merge of pulled and
  replicated copies order-independent. The hook returning marks the replica ready, and
  only then does clusterkit commit the move and let the old replica go.
* ``on_partition_unassigned`` drops the partition's data: clusterkit calls it only after
  the handoff committed.
* SIGTERM drains (``ck.leave(drain=True)``): the node hands every partition off first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

import clusterkit

from .store import Entry, Store, decode_value, encode_value

REPLICATE_TIMEOUT = 2.0
CATCHUP_GRACE = 30.0  # seconds a puller stays a replication target without being in the map


class ReplicationFailed(clusterkit.ClusterKitError):
    """A replica did not take the write; it is not acknowledged."""


class StaleEpoch(clusterkit.ClusterKitError):
    """A write came from a leader older than one this replica knows."""


class NotHeld(clusterkit.ClusterKitError):
    """This node does not hold the partition (in full)."""


class KVNode:
    """The data layer of one node."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.store = Store()
        self._ck: clusterkit.ClusterKit | None = None
        self.attached = trio.Event()
        self.catchup: dict[int, dict[str, float]] = {}
        self.complete: set[int] = set()  # partitions this node holds in full
        self.resume: dict[int, tuple[str, bytes]] = {}  # pt -> (source, token) of a broken pull
        self.stats: Counter[str] = Counter()

    @property
    def ck(self) -> clusterkit.ClusterKit:
        assert self._ck is not None
        return self._ck

    def attach(self, ck: clusterkit.ClusterKit) -> None:
        """Register the handlers on a running node."""
        self._ck = ck
        ck.peers.add_handler("kv.put", self.put)
        ck.peers.add_handler("kv.delete", self.delete)
        ck.peers.add_handler("kv.get", self.get)
        ck.peers.add_handler("kv.replicate", self.replicate)
        ck.peers.add_handler("kv.stats", self.stats_handler)
        ck.migration.source(self.source)
        self.attached.set()

    # -- hooks -----------------------------------------------------------------------------

    async def on_partition_assigned(self, pt: int, previous: clusterkit.Node | None) -> None:
        await self.attached.wait()
        # clusterkit names the source: the leader, else a live committed replica (for a new
        # replica, or a re-sync after a rejoin); None: nobody holds data, nothing to copy.
        source = previous.id if previous is not None and previous.id != self.node_id else None
        if source is not None:
            await self._pull(pt, source)
            leader = self.ck.get_leader(pt)
            if leader is not None and leader.id not in (source, self.node_id):
                await self._pull(pt, leader.id)  # we copied a follower: catch up with the leader
        self.complete.add(pt)

    async def on_partition_unassigned(self, pt: int, new_owner: clusterkit.Node | None) -> None:
        self.store.drop(pt)
        self.catchup.pop(pt, None)
        self.complete.discard(pt)
        self.stats["partitions_dropped"] += 1

    async def _pull(self, pt: int, source: str) -> None:
        data = self.store.part(pt)

        async def sink(_pt: int, entries: list[clusterkit.MigrationEntry]) -> None:
            for e in entries:
                data.apply(e.key, Entry(decode_value(e.value), e.epoch or 0, e.version or 0))

        # A pull broken off (and retried by clusterkit) resumes where it stopped.
        last_source, token = self.resume.pop(pt, ("", b""))
        after = token if last_source == source else None
        try:
            progress = await self.ck.migration.pull(pt, source, sink, after=after)
        except clusterkit.MigrationInterrupted as exc:
            if exc.progress.resume_token:
                self.resume[pt] = (source, exc.progress.resume_token)
            raise
        self.stats["pulls"] += 1
        self.stats["keys_pulled"] += progress.keys

    async def source(
        self, req: clusterkit.SourceRequest
    ) -> Any:  # an async iterator of MigrationEntry
        if req.partition not in self.complete:
            # Never serve a partial copy (a partition we are still pulling, or dropped):
            # the puller would think it has everything. It retries with another source.
            raise NotHeld(f"{self.node_id} does not hold partition {req.partition} in full")
        # From now on every write we lead for this partition also goes to the puller.
        self.catchup.setdefault(req.partition, {})[req.requester] = trio.current_time()
        for key, entry in self.store.part(req.partition).snapshot(req.after):
            yield clusterkit.MigrationEntry(
                key, encode_value(entry), version=entry.seq, epoch=entry.epoch
            )

    # -- the leader's side -----------------------------------------------------------------

    def _not_leader(self, pt: int) -> clusterkit.NotLeader:
        leader = self.ck.get_leader(pt)
        hint = leader.id if leader is not None and leader.id != self.node_id else None
        return clusterkit.NotLeader(f"{self.node_id} does not lead partition {pt}", leader=hint)

    async def put(self, payload: dict[str, Any]) -> dict[str, int]:
        return await self._write(payload["k"], payload["v"])

    async def delete(self, payload: dict[str, Any]) -> dict[str, int]:
        return await self._write(payload["k"], None)

    async def _write(self, key: str, value: bytes | None) -> dict[str, int]:
        pt = self.ck.get_partition(key)
        try:
            async with self.ck.leadership(pt) as epoch:
                data = self.store.part(pt)
                if data.max_epoch > epoch:
                    raise self._not_leader(pt)
                entry = Entry(value, epoch, data.stamp(epoch))
                data.begin(key.encode(), entry)
                committed = False
                try:
                    await self._replicate(pt, key, entry)
                    committed = True
                finally:
                    data.finish(key.encode(), entry, committed=committed)
        except clusterkit.LeadershipLost:
            raise self._not_leader(pt) from None
        except clusterkit.NotLeader as exc:
            raise self._not_leader(pt) from exc
        self.stats["writes"] += 1
        return {"epoch": entry.epoch, "seq": entry.seq}

    async def _replicate(self, pt: int, key: str, entry: Entry) -> None:
        message = {"p": pt, "k": key, "v": entry.value, "e": entry.epoch, "s": entry.seq}
        failed = await send_to_replicas(self.ck, pt, "kv.replicate", message, self.catchup)
        if failed:
            self.stats["replication_failures"] += 1
            raise ReplicationFailed(f"partition {pt}: not replicated to {'; '.join(failed)}")

    async def get(self, payload: dict[str, Any]) -> dict[str, Any]:
        key: str = payload["k"]
        pt = self.ck.get_partition(key)
        if not self.ck.is_leader(pt):
            raise self._not_leader(pt)
        entry = self.store.part(pt).entries.get(key.encode())
        self.stats["reads"] += 1
        if entry is None or entry.value is None:
            return {"found": False}
        return {"found": True, "v": entry.value, "epoch": entry.epoch, "seq": entry.seq}

    # -- the replica's side ----------------------------------------------------------------

    async def replicate(self, m: dict[str, Any]) -> bool:
        pt, epoch = m["p"], m["e"]
        view = self.ck.view
        mine = view.map is not None and (
            self.node_id in view.map.replicas[pt] or self.node_id in view.map.pending.get(pt, ())
        )
        if not mine and pt not in self.store.partitions:
            # Not ours (any more): taking it would leave a stray copy behind. A leader whose
            # view is ahead of ours retries once our view has caught up.
            raise NotHeld(f"{self.node_id} is not a replica of partition {pt}")
        data = self.store.part(pt)
        known = self.ck.leader_epoch(pt) or 0
        if epoch < data.max_epoch or epoch < known:
            self.stats["stale_rejected"] += 1
            raise StaleEpoch(f"partition {pt}: epoch {epoch} < {max(data.max_epoch, known)}")
        data.apply(m["k"].encode(), Entry(m["v"], epoch, m["s"]))
        self.stats["replicated"] += 1
        return True

    async def stats_handler(self, _payload: Any) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "partitions": len(self.store.partitions),
            "keys": sum(d.live_keys() for d in self.store.partitions.values()),
            "stats": dict(self.stats),
        }


def replica_targets(
    ck: clusterkit.ClusterKit, catchup: dict[int, dict[str, float]], pt: int
) -> tuple[list[clusterkit.Node], set[str]]:
    """Where a leader's write of ``pt`` goes: its replicas and joiners in the map, and the
    nodes copying it from this node (``catchup``: pt -> node -> since; the second result:
    those only copying, not in the map). Copiers are dropped after ``CATCHUP_GRACE``."""
    view = ck.view
    ids: set[str] = set()
    if view.map is not None:
        ids.update(view.map.replicas[pt])
        ids.update(view.map.pending.get(pt, ()))
    copying_only: set[str] = set()
    now = trio.current_time()
    copying = catchup.get(pt, {})
    for node_id, since in list(copying.items()):
        if node_id in ids:
            continue
        if now - since < CATCHUP_GRACE:
            copying_only.add(node_id)
        else:
            del copying[node_id]
    ids = (ids | copying_only) - {ck.node_id}
    return [view.nodes[i] for i in sorted(ids) if i in view.nodes], copying_only


async def send_to_replicas(
    ck: clusterkit.ClusterKit,
    pt: int,
    method: str,
    message: Any,
    catchup: dict[int, dict[str, float]],
    *,
    timeout: float = REPLICATE_TIMEOUT,
) -> list[str]:
    """Send ``message`` to every target of ``pt`` at once; the failures (empty: all took it).

    A node only copying the partition that answers ``NotHeld`` has since dropped it (it moved
    on before our view showed it in the map): it needs no more writes, and is not a failure.
    """
    targets, copying_only = replica_targets(ck, catchup, pt)
    failed: list[str] = []

    async def one(node: clusterkit.Node) -> None:
        try:
            await ck.peers.request(node, method, message, timeout=timeout)
        except clusterkit.RemoteError as exc:
            if exc.remote_type == "NotHeld" and node.id in copying_only:
                catchup.get(pt, {}).pop(node.id, None)
                return
            failed.append(f"{node.id}: {exc}")
        except clusterkit.PeerError as exc:
            failed.append(f"{node.id}: {exc}")

    async with trio.open_nursery() as nursery:
        for node in targets:
            nursery.start_soon(one, node)
    return failed


class PartitionHooks(Protocol):
    """What an example node hands clusterkit: its data-moving hooks."""

    async def on_partition_assigned(self, pt: int, previous: clusterkit.Node | None) -> None: ...

    async def on_partition_unassigned(self, pt: int, new_owner: clusterkit.Node | None) -> None: ...


def node_config(
    node: PartitionHooks, args: argparse.Namespace, *, http_port: int = 0, grpc_port: int = 0
) -> clusterkit.Config:
    """The examples' node config from their common flags (several nodes share one host)."""
    return clusterkit.Config(
        node_id=args.id,
        etcd_endpoints=args.etcd.split(","),
        etcd_prefix=args.prefix,
        http_port=http_port,
        metrics_port=None,
        grpc_port=grpc_port,
        partitions=args.partitions,
        replica_factor=args.replicas,
        session_ttl=args.session_ttl,
        rebalance_delay=args.rebalance_delay,
        on_partition_assigned=node.on_partition_assigned,
        on_partition_unassigned=node.on_partition_unassigned,
    )


def emit(event: dict[str, Any]) -> None:
    with contextlib.suppress(BrokenPipeError):  # the parent is gone (we leave with it)
        print(json.dumps(event), flush=True)


async def until_stdin_closes(scope: trio.CancelScope) -> None:
    """Leave when the parent closes our stdin (or dies): no orphaned nodes."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some():
            pass
    scope.cancel()


async def run_node(
    config: clusterkit.Config,
    *,
    setup: Callable[[clusterkit.ClusterKit], Awaitable[None] | None],
    parent_stdin: bool,
    started: Callable[[clusterkit.ClusterKit, trio.Nursery], Awaitable[None]],
    draining: Callable[[], None] | None = None,
    drain_timeout: float = 60.0,
) -> None:
    """Run one example node until SIGINT (leave), SIGTERM (drain, then leave) or, with
    ``parent_stdin``, until stdin closes (the demo that started it is gone).

    ``setup`` registers what the hooks rely on before any hook runs; ``started(ck, nursery)``
    runs once the node is up (serve an API, report "up"); ``draining()`` when SIGTERM came.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            if parent_stdin:
                nursery.start_soon(until_stdin_closes, nursery.cancel_scope)
            async with clusterkit.open_cluster(config, setup=setup) as ck:
                await started(ck, nursery)
                async for signum in signals:
                    if signum == signal.SIGTERM:
                        if draining is not None:
                            draining()
                        with trio.move_on_after(drain_timeout):
                            await ck.leave(drain=True)
                    break
            nursery.cancel_scope.cancel()


async def main(args: argparse.Namespace) -> None:
    node = KVNode(args.id)

    async def started(ck: clusterkit.ClusterKit, _: trio.Nursery) -> None:
        emit({"event": "up", "node": args.id, "addr": ck.peers.address, "t": time.time()})

    await run_node(
        node_config(node, args),
        setup=node.attach,
        parent_stdin=args.parent_stdin,
        started=started,
        draining=lambda: emit({"event": "draining", "node": args.id, "t": time.time()}),
        drain_timeout=args.drain_timeout,
    )
    emit({"event": "left", "node": args.id, "t": time.time(), "stats": dict(node.stats)})


def node_arguments(
    description: str, *, prefix: str, partitions: int, replicas: int
) -> argparse.ArgumentParser:
    """The flags every example node takes (what :func:`node_config` and :func:`run_node`
    read); each example adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--id", required=True)
    p.add_argument("--etcd", required=True, help="comma-separated host:port list")
    p.add_argument("--prefix", default=prefix)
    p.add_argument("--partitions", type=int, default=partitions)
    p.add_argument("--replicas", type=int, default=replicas)
    p.add_argument("--session-ttl", type=float, default=2.0)
    p.add_argument("--rebalance-delay", type=float, default=1.0)
    p.add_argument(
        "--parent-stdin", action="store_true", help="leave when stdin closes (demo/tests)"
    )
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    p = node_arguments(__doc__.split("\n")[0], prefix="/kvstore", partitions=64, replicas=3)
    p.add_argument("--drain-timeout", type=float, default=60.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(main, parse(sys.argv[1:]))
