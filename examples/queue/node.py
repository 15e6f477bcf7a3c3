"""One node of the partitioned, replicated message queue: ``python -m examples.queue.node --id n1
--data-dir DIR --etcd host:port [--fsync always|interval|never]``.

Theory of operation
-------------------
A topic's messages are spread over clusterkit's partitions by key; each partition is one log
(``log.py``) on each of its R replicas, on disk.

* **Produce** (``queue.produce``, routed to the partition's leader): inside
  ``ck.leadership(pt)``, under the partition's lock, the leader stamps the batch with its epoch
  and the next offsets, appends it to its own log, sends it to every live replica (committed,
  joining, and nodes copying the partition from it) and answers only when all appended it.
  The **high watermark** (hw) is then past the batch: every record below it is on every live
  replica, so any replica that can become leader has it.
* **Replicas** (``queue.append``) refuse an epoch older than the partition's leader epoch they
  know. A record at an offset they already hold under another epoch replaces their tail from
  there (it was appended by a deposed leader and never acknowledged); one they already hold
  under the same epoch is a duplicate; a gap is answered with their log's end, and the leader
  sends the missing records first.
* **Consumers** (``queue.fetch``, at the leader) read only below the hw: a consumer never sees
  a record that a failover could take back. A group's committed position (``queue.commit``) is
  itself a record in the partition's log, so it is replicated, stored and recovered with it.
* **A new or returning replica** (``on_partition_assigned``) first finds where its log (from
  its disk, maybe empty) agrees with the source's: it asks ``queue.match`` for its last
  ``(offset, epoch)`` and cuts its tail back to the end of that epoch in the source's log until
  they match (the log-matching rule: equal ``(offset, epoch)`` means equal logs up to there).
  It then pulls the rest through ``ck.migration.pull``, resumable from an offset (the resume
  token is the offset). Appends the leader replicates to it meanwhile are kept aside and
  applied in offset order as the pull reaches them.
* ``on_partition_unassigned`` deletes the partition's log: clusterkit calls it only after the
  handoff committed.
* The log's file I/O (and its fsync, every ``FSYNC_INTERVAL`` by default) runs in the event
  loop: simple, and short on a local disk; a production log would batch appends and fsync in
  a thread (``trio.to_thread.run_sync``).

Semantics (README): per-partition order; at-least-once delivery. Producers are idempotent per
partition: a batch is one producer's consecutive sequence numbers, and a retried batch that the
leader's log already holds is not appended again (the leader re-replicates it and answers with
its offsets). Consumers may see a record again after a change of group member or of leader
(from the last committed position).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import trio
import trio.lowlevel

import clusterkit
from examples.kv_store.node import (
    ReplicationFailed,
    emit,
    node_arguments,
    node_config,
    replica_targets,
    run_node,
)

from .log import PartitionLog, Record

REPLICATE_TIMEOUT = 3.0
MAX_GAP = 20_000  # records a leader sends a replica behind it with a batch, at most
MAX_PENDING = 200_000  # appends a replica keeps aside while it copies the partition
FETCH_SCAN = 5_000


class NotHeld(clusterkit.ClusterKitError):
    """This node does not hold the partition (in full)."""


class StaleEpoch(clusterkit.ClusterKitError):
    """An append from a leader older than one this replica knows."""


def offset_key(offset: int) -> bytes:
    return offset.to_bytes(8, "big")


class QueueNode:
    """The data layer of one queue node."""

    def __init__(self, node_id: str, data_dir: Path, *, fsync: str = "interval") -> None:
        self.node_id = node_id
        self.data_dir = data_dir
        self.fsync = fsync
        self.logs: dict[int, PartitionLog] = {}
        self.hw: dict[int, int] = {}  # leader: offsets below it are on every live replica
        self.locks: dict[int, trio.Lock] = {}
        self.ready: set[int] = set()
        self.pending: dict[int, dict[int, Record]] = {}  # pt -> appends kept aside while copying
        self.catchup: dict[int, dict[str, float]] = {}
        self.positions: dict[int, dict[str, int]] = {}  # pt -> group -> committed position
        self.producers: dict[
            int, dict[str, tuple[int, int]]
        ] = {}  # pt -> producer -> (seq, offset)
        self.stats: Counter[str] = Counter()
        self._ck: clusterkit.ClusterKit | None = None

    @property
    def ck(self) -> clusterkit.ClusterKit:
        assert self._ck is not None
        return self._ck

    def attach(self, ck: clusterkit.ClusterKit) -> None:
        """Register the handlers and the migration source: ``open_cluster(..., setup=...)``
        runs it before any hook, so the hooks can rely on ``self.ck``."""
        self._ck = ck
        for name, fn in (
            ("queue.produce", self.produce),
            ("queue.append", self.append),
            ("queue.match", self.match),
            ("queue.fetch", self.fetch),
            ("queue.commit", self.commit),
            ("queue.position", self.position),
            ("queue.stats", self.describe),
        ):
            ck.peers.add_handler(name, fn)
        ck.migration.source(self.source)

    def log(self, pt: int) -> PartitionLog:
        log = self.logs.get(pt)
        if log is None:
            log = self.logs[pt] = PartitionLog(self.data_dir / f"p{pt:05d}", fsync=self.fsync)
            self.stats["bytes_cut_on_recovery"] += log.recovered_bytes_cut
            self._rebuild(pt)
        return log

    def close(self) -> None:
        """Close every log file (the node is gone)."""
        for log in self.logs.values():
            log.close()

    def recover(self) -> int:
        """Open every log this node kept on disk (before it joins); the records recovered."""
        total = 0
        for path in sorted(self.data_dir.glob("p*")):
            if path.is_dir() and path.name[1:].isdigit():
                total += self.log(int(path.name[1:])).next_offset
        return total

    def _rebuild(self, pt: int) -> None:
        """Positions and producers' sequence numbers, from the log (after recovery or a cut)."""
        self.positions[pt], self.producers[pt] = {}, {}
        for record in self.logs[pt].records:
            self._note(pt, record)

    def _note(self, pt: int, record: Record) -> None:
        if record.kind == "c":
            groups = self.positions.setdefault(pt, {})
            groups[record.topic] = max(groups.get(record.topic, 0), record.seq)
        elif record.producer:
            producers = self.producers.setdefault(pt, {})
            if record.seq >= producers.get(record.producer, (-1, 0))[0]:
                producers[record.producer] = (record.seq, record.offset)

    def _truncate(self, pt: int, offset: int) -> None:
        self.logs[pt].truncate(offset)
        self._rebuild(pt)

    # -- hooks ---------------------------------------------------------------------------

    async def on_partition_assigned(self, pt: int, previous: clusterkit.Node | None) -> None:
        self.log(pt)  # recovered from disk, if this node held it before
        source = previous.id if previous is not None and previous.id != self.node_id else None
        if source is not None:
            self.pending[pt] = {}
            try:
                await self._sync(pt, source)
                leader = self.ck.get_leader(pt)
                if leader is not None and leader.id not in (source, self.node_id):
                    await self._sync(pt, leader.id)
            finally:
                self.pending.pop(pt, None)
        self.ready.add(pt)  # our hw starts at 0: a fetch as leader first re-sends the tail

    async def on_partition_unassigned(self, pt: int, new_owner: clusterkit.Node | None) -> None:
        self.ready.discard(pt)
        self.catchup.pop(pt, None)
        self.hw.pop(pt, None)
        log = self.logs.pop(pt, None)
        if log is not None:
            log.close()
            shutil.rmtree(log.dir, ignore_errors=True)
        self.positions.pop(pt, None)

    async def _sync(self, pt: int, source: str) -> None:
        log = self.log(pt)
        while log.next_offset > 0:  # find where our log and the source's agree
            last = log.next_offset - 1
            answer = await self.ck.peers.request(
                source, "queue.match", {"p": pt, "o": last, "e": log.epoch_at(last)}
            )
            if answer["match"]:
                break
            self.stats["truncated"] += log.next_offset - min(answer["end"], last)
            self._truncate(pt, min(answer["end"], last))
        after = offset_key(log.next_offset - 1) if log.next_offset else None

        async def sink(_pt: int, entries: list[clusterkit.MigrationEntry]) -> None:
            for e in entries:
                self._accept(pt, Record(*msgpack.unpackb(e.value)))
            self.stats["copied"] += len(entries)

        await self.ck.migration.pull(pt, source, sink, after=after)

    async def source(self, req: clusterkit.SourceRequest) -> Any:
        if req.partition not in self.ready:
            raise NotHeld(f"{self.node_id} does not hold partition {req.partition} in full")
        self.catchup.setdefault(req.partition, {})[req.requester] = trio.current_time()
        log = self.log(req.partition)
        offset = int.from_bytes(req.after, "big") + 1 if req.after else 0
        while offset < log.next_offset:  # the log may grow meanwhile: follow it
            for record in log.read(offset, 1000):
                yield clusterkit.MigrationEntry(
                    offset_key(record.offset), msgpack.packb(record.wire())
                )
                offset = record.offset + 1
            await trio.lowlevel.checkpoint()

    # -- the leader's side ---------------------------------------------------------------

    def _not_leader(self, pt: int) -> clusterkit.NotLeader:
        leader = self.ck.get_leader(pt)
        hint = leader.id if leader is not None and leader.id != self.node_id else None
        return clusterkit.NotLeader(f"{self.node_id} does not lead partition {pt}", leader=hint)

    @contextlib.asynccontextmanager
    async def _serving_leader(self, pt: int) -> AsyncIterator[int]:
        """Hold ``pt``'s leadership (yields its epoch) and its lock, as the leader that serves
        it; ``NotLeader`` (with a hint) otherwise, or when the leadership is lost meanwhile."""
        try:
            async with self.ck.leadership(pt) as epoch:
                if pt not in self.ready:
                    raise self._not_leader(pt)
                async with self.locks.setdefault(pt, trio.Lock()):
                    yield epoch
        except clusterkit.LeadershipLost:
            raise self._not_leader(pt) from None

    async def produce(self, m: dict[str, Any]) -> dict[str, int]:
        """``{"p", "t": topic, "m": [[key, value, producer, seq], ...]}`` -> first offset."""
        pt, topic = m["p"], m["t"]
        async with self._serving_leader(pt) as epoch:
            log = self.log(pt)
            if log.next_offset and (log.epoch_at(log.next_offset - 1) or 0) > epoch:
                raise self._not_leader(pt)  # a newer leader's records are here
            duplicate = self._already_appended(pt, m["m"])
            if duplicate is not None:  # a retry of a batch our log holds
                await self._advance_hw(pt, locked=True)
                if self.hw.get(pt, 0) <= duplicate + len(m["m"]) - 1:
                    raise ReplicationFailed(f"partition {pt}: retry not replicated yet")
                self.stats["duplicate_batches"] += 1
                return {"offset": duplicate, "count": len(m["m"])}
            base = log.next_offset
            records = [
                Record(base + i, epoch, "m", topic, k, v, producer, seq)
                for i, (k, v, producer, seq) in enumerate(m["m"])
            ]
            await self._write(pt, epoch, records)
        self.stats["produced"] += len(records)
        return {"offset": base, "count": len(records)}

    def _already_appended(self, pt: int, batch: list[list[Any]]) -> int | None:
        """The first offset of ``batch`` if the log holds it already (idempotent producers: a
        batch is one producer's consecutive sequence numbers, appended whole)."""
        producer, last_seq = batch[-1][2], batch[-1][3]
        known = self.producers.get(pt, {}).get(producer) if producer else None
        if known is None or known[0] < last_seq:
            return None
        seq, offset = known
        first: int = offset - (seq - int(batch[0][3]))
        return first

    async def _write(self, pt: int, epoch: int, records: list[Record]) -> None:
        log = self.log(pt)
        log.append(records)
        for record in records:
            self._note(pt, record)
        await self._replicate(pt, epoch, records)
        self.hw[pt] = records[-1].offset + 1

    async def _replicate(self, pt: int, epoch: int, records: list[Record]) -> None:
        targets, copying_only = replica_targets(self.ck, self.catchup, pt)
        log = self.log(pt)
        failed: list[str] = []

        async def one(node: clusterkit.Node) -> None:
            batch = records
            for _ in range(2):
                message = {"p": pt, "e": epoch, "r": [r.wire() for r in batch]}
                try:
                    answer = await self.ck.peers.request(
                        node, "queue.append", message, timeout=REPLICATE_TIMEOUT
                    )
                except clusterkit.RemoteError as exc:
                    if exc.remote_type == "NotHeld" and node.id in copying_only:
                        self.catchup.get(pt, {}).pop(node.id, None)
                        return
                    failed.append(f"{node.id}: {exc}")
                    return
                except clusterkit.PeerError as exc:
                    failed.append(f"{node.id}: {exc}")
                    return
                if answer["ok"]:
                    return
                behind = answer["next"]  # a gap: send what it misses first
                if records[0].offset - behind > MAX_GAP:
                    failed.append(f"{node.id}: {records[0].offset - behind} records behind")
                    return
                batch = log.read(behind, MAX_GAP + len(records), records[-1].offset + 1)
                self.stats["gaps_filled"] += 1
            failed.append(f"{node.id}: still behind")

        async with trio.open_nursery() as nursery:
            for node in targets:
                nursery.start_soon(one, node)
        if failed:
            self.stats["replication_failures"] += 1
            raise ReplicationFailed(f"partition {pt}: not appended by {'; '.join(failed)}")

    async def match(self, m: dict[str, Any]) -> dict[str, Any]:
        """Does our log hold ``(offset, epoch)``? If not, where the asker's epoch ends here."""
        if m["p"] not in self.ready:
            raise NotHeld(f"{self.node_id} does not hold partition {m['p']} in full")
        log = self.log(m["p"])
        if log.epoch_at(m["o"]) == m["e"]:
            return {"match": True}
        return {"match": False, "end": log.end_of_epoch(m["e"] or 0)}

    # -- the replica's side --------------------------------------------------------------

    async def append(self, m: dict[str, Any]) -> dict[str, Any]:
        pt, epoch = m["p"], m["e"]
        view = self.ck.view
        mine = view.map is not None and (
            self.node_id in view.map.replicas[pt] or self.node_id in view.map.pending.get(pt, ())
        )
        if not mine and pt not in self.logs and pt not in self.pending:
            raise NotHeld(f"{self.node_id} is not a replica of partition {pt}")
        known = self.ck.leader_epoch(pt) or 0
        if epoch < known:
            self.stats["stale_rejected"] += 1
            raise StaleEpoch(f"partition {pt}: epoch {epoch} < {known}")
        for wire in m["r"]:
            if not self._accept(pt, Record(*wire)):
                return {"ok": False, "next": self.log(pt).next_offset}
        self.stats["appended"] += len(m["r"])
        return {"ok": True}

    def _accept(self, pt: int, record: Record) -> bool:
        """Take one record in offset order; False: a gap (the caller sends what is missing)."""
        log = self.log(pt)
        o = record.offset
        if o < log.next_offset:
            if log.epoch_at(o) == record.epoch:
                return True  # already here
            self._truncate(pt, o)  # a deposed leader's tail: replaced from here
            self.stats["truncated"] += 1
        if o > log.next_offset:
            pending = self.pending.get(pt)
            if pending is None:
                return False
            if len(pending) >= MAX_PENDING:
                raise clusterkit.ClusterKitError(f"partition {pt}: too far behind while copying")
            pending[o] = record
            return True
        log.append([record])
        self._note(pt, record)
        pending = self.pending.get(pt)
        while pending and log.next_offset in pending:
            self._accept(pt, pending.pop(log.next_offset))
        return True

    # -- consumers -----------------------------------------------------------------------

    async def fetch(self, m: dict[str, Any]) -> dict[str, Any]:
        """Messages of topic ``t`` from offset ``o`` below the hw (at most ``n``)."""
        pt = m["p"]
        if not self.ck.is_leader(pt) or pt not in self.ready:
            raise self._not_leader(pt)
        log = self.log(pt)
        if self.hw.get(pt, 0) < log.next_offset:
            await self._advance_hw(pt)
        start, hw = m["o"], self.hw.get(pt, 0)
        out = []
        scanned = log.read(start, FETCH_SCAN, hw)
        for record in scanned:
            if record.kind == "m" and record.topic == m["t"]:
                out.append(record)
                if len(out) >= m["n"]:
                    break
        nxt = out[-1].offset + 1 if len(out) >= m["n"] else start + len(scanned)
        self.stats["fetched"] += len(out)
        return {"records": [r.wire() for r in out], "next": nxt, "hw": hw}

    async def _advance_hw(self, pt: int, *, locked: bool = False) -> None:
        """Records past the hw (a new leader's tail, or a batch whose replication failed):
        send them to every live replica again; once all have them, consumers may see them."""
        try:
            async with self.ck.leadership(pt) as epoch, contextlib.AsyncExitStack() as stack:
                if not locked:
                    await stack.enter_async_context(self.locks.setdefault(pt, trio.Lock()))
                log = self.log(pt)
                start = self.hw.get(pt, 0)
                tail = log.read(start, MAX_GAP)
                if tail:
                    await self._replicate(pt, epoch, tail)
                    self.hw[pt] = tail[-1].offset + 1
                    self.stats["hw_advanced"] += 1
        except (clusterkit.LeadershipLost, ReplicationFailed):
            pass  # consumers see the tail later

    async def commit(self, m: dict[str, Any]) -> dict[str, int]:
        """Commit group ``g``'s position ``o`` in partition ``p`` (a record in the log)."""
        pt = m["p"]
        async with self._serving_leader(pt) as epoch:
            log = self.log(pt)
            record = Record(log.next_offset, epoch, "c", m["g"], b"", b"", "", m["o"])
            await self._write(pt, epoch, [record])
        return {"position": self.positions[pt][m["g"]]}

    async def position(self, m: dict[str, Any]) -> int:
        pt = m["p"]
        if not self.ck.is_leader(pt) or pt not in self.ready:
            raise self._not_leader(pt)
        return self.positions.get(pt, {}).get(m["g"], 0)

    async def describe(self, _: Any = None) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "partitions": sorted(self.ready),
            "records": sum(log.next_offset for log in self.logs.values()),
            "stats": dict(self.stats),
        }


async def main(args: argparse.Namespace) -> None:
    node = QueueNode(args.id, Path(args.data_dir), fsync=args.fsync)
    recovered = node.recover()

    async def started(ck: clusterkit.ClusterKit, _: trio.Nursery) -> None:
        emit({"event": "up", "node": args.id, "recovered": recovered})

    await run_node(
        node_config(node, args),
        setup=node.attach,
        parent_stdin=args.parent_stdin,
        started=started,
        draining=lambda: emit({"event": "draining", "node": args.id}),
    )
    node.close()
    emit({"event": "left", "node": args.id, "stats": dict(node.stats)})


def parse(argv: list[str]) -> argparse.Namespace:
    p = node_arguments(__doc__.split("\n")[0], prefix="/queue", partitions=16, replicas=3)
    p.add_argument("--data-dir", required=True, help="this node's logs (kept across restarts)")
    p.add_argument("--fsync", choices=("always", "interval", "never"), default="interval")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(main, parse(sys.argv[1:]))
