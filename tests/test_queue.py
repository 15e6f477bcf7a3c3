"""The message queue example (examples/queue): its log on disk, the whole system on real etcd
(node processes, a consumer group), and the nodes in virtual time under seeded faults."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import clusterkit
from clusterkit.testing import TestCluster, open_test_cluster
from examples.queue import log as log_module
from examples.queue.demo import run
from examples.queue.log import PartitionLog, Record
from examples.queue.node import QueueNode


def _reopened(path: Path) -> list[Record]:
    log = PartitionLog(path)
    log.close()
    return log.records


def _records(start: int, n: int, epoch: int = 1) -> list[Record]:
    return [
        Record(start + i, epoch, "m", "t", b"k", b"v%d" % (start + i), "p", start + i)
        for i in range(n)
    ]


# -- the log on disk ---------------------------------------------------------------------------


def test_the_log_survives_a_reopen_and_cuts_a_torn_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_module, "SEGMENT_BYTES", 500)  # several segments
    log = PartitionLog(tmp_path / "p0", fsync="always")
    log.append(_records(0, 100))
    log.close()
    segments = sorted((tmp_path / "p0").glob("*.log"))
    assert len(segments) > 3
    with open(segments[-1], "ab") as f:  # a crash mid-write: half a record
        f.write(_records(100, 1)[0].pack()[:-5])
    reopened = PartitionLog(tmp_path / "p0")
    assert reopened.next_offset == 100 and reopened.recovered_bytes_cut > 0
    assert reopened.records == _records(0, 100)
    reopened.append(_records(100, 5))  # appends continue after the cut
    reopened.close()
    assert _reopened(tmp_path / "p0") == _records(0, 105)


def test_a_flipped_byte_ends_the_log_there(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path / "p0")
    log.append(_records(0, 10))
    log.close()
    path = next((tmp_path / "p0").glob("*.log"))
    data = bytearray(path.read_bytes())
    record_size = len(_records(0, 1)[0].pack())
    data[record_size * 6 + 12] ^= 0xFF  # inside record 6's body: its checksum fails
    path.write_bytes(bytes(data))
    assert len(_reopened(tmp_path / "p0")) == 6


def test_truncate_and_epochs(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path / "p0")
    log.append(_records(0, 5, epoch=1) + _records(5, 5, epoch=3))
    assert log.end_of_epoch(1) == 5 and log.end_of_epoch(2) == 5 and log.end_of_epoch(3) == 10
    log.truncate(7)
    assert log.next_offset == 7 and log.epoch_at(6) == 3
    with pytest.raises(ValueError, match="continue"):
        log.append(_records(9, 1))
    log.close()
    assert len(_reopened(tmp_path / "p0")) == 7


# -- the system on real etcd -------------------------------------------------------------------


@pytest.mark.slow
async def test_demo_loses_nothing_and_keeps_partition_order_through_faults() -> None:
    lines: list[str] = []
    with trio.fail_after(240):
        report = await run(messages=12_000, producers=3, batch=50, log=lines.append)
    print("\n".join(lines + report.lines()))
    assert report.acknowledged == 12_000
    assert report.lost == 0, report.lost_examples
    assert report.out_of_order == 0
    assert report.consumed_unique == 12_000
    assert len(report.events) == 5  # SIGKILL, join, consumer stop, drain, restart
    assert report.restarted_recovered > 0  # the restarted node read its logs back from disk


# -- virtual time, seeded faults ---------------------------------------------------------------


class VirtualQueue:
    """Queue nodes on a clusterkit.testing cluster, each with its own data directory."""

    def __init__(self, cluster: TestCluster, root: Path) -> None:
        self.cluster = cluster
        self.root = root
        self.nodes: dict[str, QueueNode] = {}
        self.acked: dict[tuple[str, int], int] = {}  # (producer, seq) -> partition

    async def start(self, node_id: str) -> None:
        old = self.nodes.get(node_id)
        if old is not None:  # a restart: the crashed process's files are gone with it
            old.close()
        node = self.nodes[node_id] = QueueNode(node_id, self.root / node_id)
        node.recover()
        await self.cluster.start(
            node_id,
            setup=node.attach,
            on_partition_assigned=node.on_partition_assigned,
            on_partition_unassigned=node.on_partition_unassigned,
        )

    def leader(self, pt: int) -> QueueNode | None:
        live = [self.nodes[n] for n in self.cluster.nodes]
        return next((n for n in live if n.ck.is_leader(pt) and pt in n.ready), None)

    async def produce(self, pt: int, producer: str, first: int, n: int) -> None:
        batch = [
            [b"k", b"%s-%d" % (producer.encode(), s), producer, s] for s in range(first, first + n)
        ]
        with trio.move_on_after(60):
            while True:
                node = self.leader(pt)
                if node is not None:
                    try:
                        await node.produce({"p": pt, "t": "t", "m": batch})
                    except clusterkit.ClusterKitError:
                        pass
                    else:
                        for s in range(first, first + n):
                            self.acked[(producer, s)] = pt
                        return
                await trio.sleep(0.05)

    async def check(self, partitions: int) -> list[str]:
        """Every acknowledged message once, in its partition, in order, below the hw."""
        with trio.fail_after(120):
            await self.cluster.wait_converged()
            for n in self.cluster.nodes.values():
                await n.ck._views.wait_for(lambda v: len(v.leaders) == partitions)
        problems: list[str] = []
        seen: dict[tuple[str, int], int] = {}
        for pt in range(partitions):
            with trio.fail_after(30):
                while (leader := self.leader(pt)) is None:
                    await trio.sleep(0.1)
            wires: list[Any] = []
            offset = 0
            while True:  # page through the log below the hw
                answer = await leader.fetch({"p": pt, "t": "t", "o": offset, "n": 1_000_000})
                wires += answer["records"]
                if answer["next"] == offset:
                    break
                offset = answer["next"]
            last: dict[str, int] = {}
            for wire in wires:
                record = Record(*wire)
                key = (record.producer, record.seq)
                if key in seen:
                    problems.append(f"duplicate {key}")
                seen[key] = pt
                if record.seq <= last.get(record.producer, -1):
                    problems.append(f"out of order {key} in partition {pt}")
                last[record.producer] = record.seq
        for key, pt in self.acked.items():
            if seen.get(key) != pt:
                problems.append(f"lost {key} of partition {pt}")
        return problems


async def _random_faults(seed: int, root: Path) -> tuple[int, list[str], list[str]]:
    rng = random.Random(seed)
    async with open_test_cluster(
        partitions=4, replica_factor=3, session_ttl=2.0, rebalance_delay=1.0
    ) as cluster:
        queue = VirtualQueue(cluster, root)
        names = iter(f"n{i}" for i in range(1, 100))
        for _ in range(3):
            await queue.start(next(names))
        await cluster.wait_converged()
        stop = trio.Event()
        faults: list[str] = []

        async def producer(name: str) -> None:
            seq = 0
            while not stop.is_set():
                await queue.produce(rng.randrange(4), name, seq, 20)
                seq += 20
                await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            for p in range(3):
                nursery.start_soon(producer, f"p{p}")
            ops = ["kill", "join", "drain", "restart", rng.choice(["kill", "join", "restart"])]
            rng.shuffle(ops)  # every kind of fault, in a seeded order at seeded times
            for op in ops:
                await trio.sleep(rng.uniform(0.5, 3))
                live = sorted(cluster.nodes)
                if (op == "kill" and len(live) > 2) or (op == "restart" and len(live) > 1):
                    victim = rng.choice(live)
                    await cluster.kill(victim)
                    if op == "restart":  # the same node, on its data directory
                        await trio.sleep(3)  # its old session expires first
                        await queue.start(victim)
                elif op == "join":
                    await queue.start(next(names))
                elif op == "drain" and len(live) > 2:
                    with trio.move_on_after(30):
                        await cluster.stop(rng.choice(live), drain=True)
                else:
                    continue
                faults.append(op)
            await trio.sleep(2)
            stop.set()
        problems = await queue.check(4)
        for node in queue.nodes.values():
            node.close()
        return len(queue.acked), faults, problems


@pytest.mark.parametrize("seed", range(4))
async def test_virtual_time_faults_lose_no_acknowledged_message(
    seed: int, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    acked, faults, problems = await _random_faults(seed, tmp_path)
    assert acked > 100 and "restart" in faults, (acked, faults)
    assert problems == [], (seed, faults, problems[:5])
