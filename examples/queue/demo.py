"""The queue under faults: ``python -m examples.queue.demo``.

Starts an etcd (the embedded one), three ``examples.queue.node`` processes with their own data
directories, producers and a consumer group of three members (in this process), and sends
``--messages`` messages. Meanwhile: a SIGKILL of the node that leads the most partitions, a
fourth node joining, a drain (SIGTERM) of another, the killed node restarted on its own data
directory (it recovers its logs from disk and re-syncs what it missed), and one consumer
stopped (its partitions are taken over from the committed positions). The report: messages
acknowledged, consumed, lost (acknowledged but never consumed: must be 0), out of order within
a partition (must be 0), duplicates (and why), failover time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import clusterkit
from examples.http_kv.demo import _drain

from .consumer import GroupMember, partition_of, produce
from .log import Record

TOPIC = "orders"
GROUP = "billing"


@dataclass
class Report:
    messages: int = 0
    acknowledged: int = 0
    consumed_unique: int = 0
    delivered: int = 0
    lost: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    slowest_produce: float = 0.0
    restarted_recovered: int = 0
    events: list[str] = field(default_factory=list)
    lost_examples: list[tuple[str, int]] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"messages acknowledged {self.acknowledged:,} of {self.messages:,}",
            f"consumed {self.consumed_unique:,} distinct ({self.delivered:,} deliveries)",
            f"lost {self.lost} (must be 0); out of order within a partition "
            f"{self.out_of_order} (must be 0)",
            f"duplicates {self.duplicates:,} (redelivered after a consumer or leader change "
            "from the last committed position, or a producer retry of an unacknowledged "
            "batch: at-least-once)",
            f"slowest acknowledged batch {self.slowest_produce:.2f} s (the failover)",
            *self.events,
        ]


class Nodes:
    """Queue node processes with their data directories."""

    def __init__(self, endpoints: list[str], prefix: str, root: Path, partitions: int) -> None:
        self.endpoints = endpoints
        self.prefix = prefix
        self.root = root
        self.partitions = partitions
        self.procs: dict[str, trio.Process] = {}
        self.recovered: dict[str, int] = {}  # records each node recovered from disk at start

    async def start(self, nursery: trio.Nursery, node_id: str) -> None:
        old = self.procs.get(node_id)
        if old is not None:  # a restart: reap the old process first
            with trio.fail_after(10):
                await old.wait()
        proc = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "examples.queue.node",
                "--id",
                node_id,
                "--data-dir",
                str(self.root / node_id),
                "--etcd",
                ",".join(self.endpoints),
                "--prefix",
                self.prefix,
                "--partitions",
                str(self.partitions),
                "--parent-stdin",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        assert proc.stdout is not None
        buffer = b""
        with trio.fail_after(30):
            while b'"up"' not in buffer:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"queue node {node_id} exited before it was up")
                buffer += chunk
        line = next(x for x in buffer.splitlines() if b'"up"' in x)
        self.recovered[node_id] = json.loads(line)["recovered"]
        self.procs[node_id] = proc
        nursery.start_soon(_drain, proc)

    def signal(self, node_id: str, signum: int) -> None:
        self.procs[node_id].send_signal(signum)

    async def aclose(self) -> None:
        for proc in self.procs.values():
            if proc.stdin is not None:
                await proc.stdin.aclose()
        with trio.move_on_after(15):
            for proc in self.procs.values():
                await proc.wait()
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()


async def run(
    *,
    messages: int = 100_000,
    producers: int = 4,
    batch: int = 100,
    partitions: int = 16,
    log: Any = print,
    seed: int = 7,
) -> Report:
    rng = random.Random(seed)
    report = Report(messages=messages)
    acked: set[tuple[str, int]] = set()
    seen: dict[tuple[str, int], int] = defaultdict(int)
    async with clusterkit.open_embedded_etcd() as etcd, trio.open_nursery() as nursery:
        root = Path(tempfile.mkdtemp(prefix="queue-demo-"))
        prefix = f"/queue-demo-{os.getpid()}"
        nodes = Nodes(list(etcd.endpoints), prefix, root, partitions)
        for node_id in ("n1", "n2", "n3"):
            await nodes.start(nursery, node_id)
        config = clusterkit.ClientConfig(etcd_endpoints=etcd.endpoints, etcd_prefix=prefix)
        async with clusterkit.open_client(config) as routing:
            with trio.fail_after(60):
                await routing.wait_ready()
            log(f"3 queue nodes up, {partitions} partitions, R=3; data in {root}")

            order: dict[tuple[str, int, int], int] = {}

            def handler(member_id: str) -> Any:
                async def handle(pt: int, record: Record, run: int) -> None:
                    # Within one run (a member's lead of a partition) offsets only grow; a new
                    # run starts again at the committed position (redeliveries).
                    key = (member_id, pt, run)
                    if record.offset <= order.get(key, -1):
                        report.out_of_order += 1
                    order[key] = record.offset
                    seen[(record.producer, record.seq)] += 1

                return handle

            member_scopes: dict[str, trio.CancelScope] = {}

            async def member(member_id: str) -> None:
                with trio.CancelScope() as scope:
                    member_scopes[member_id] = scope
                    await GroupMember(
                        member_id,
                        GROUP,
                        TOPIC,
                        routing,
                        etcd_endpoints=list(etcd.endpoints),
                        queue_prefix=prefix,
                        partitions=partitions,
                        handler=handler(member_id),
                    ).run()

            consumers = trio.open_nursery()
            async with consumers as group:
                for i in range(3):
                    group.start_soon(member, f"c{i + 1}")

                sent = [0]

                async def producer(name: str) -> None:
                    seq = 0
                    while sent[0] < messages:
                        n = min(batch, messages - sent[0])
                        sent[0] += n
                        key = b"customer-%d" % rng.randrange(1000)  # its messages in order
                        pt = partition_of(routing, TOPIC, key)
                        msgs = [
                            (key, b"%s:%d" % (name.encode(), seq + i), name, seq + i)
                            for i in range(n)
                        ]
                        started = trio.current_time()
                        await produce(routing, pt, TOPIC, msgs)
                        report.slowest_produce = max(
                            report.slowest_produce, trio.current_time() - started
                        )
                        acked.update((name, seq + i) for i in range(n))
                        seq += n

                async def faults() -> None:
                    def at(fraction: float) -> bool:
                        return len(acked) >= fraction * messages

                    async def until(fraction: float) -> None:
                        while not at(fraction):
                            await trio.sleep(0.05)

                    await until(0.2)
                    leaders: dict[str, int] = defaultdict(int)
                    for pt in range(partitions):
                        leader = routing.get_leader(pt)
                        if leader is not None:
                            leaders[leader.id] += 1
                    busiest = max(leaders, key=lambda n: leaders[n])
                    nodes.signal(busiest, signal.SIGKILL)
                    report.events.append(
                        f"SIGKILL {busiest} (led {leaders[busiest]} partitions) at "
                        f"{len(acked):,} acknowledged"
                    )
                    log(report.events[-1])
                    await until(0.4)
                    await nodes.start(nursery, "n4")
                    report.events.append(f"n4 joined at {len(acked):,}")
                    log(report.events[-1])
                    await until(0.55)
                    member_scopes["c2"].cancel()
                    report.events.append(f"consumer c2 stopped at {len(acked):,}")
                    log(report.events[-1])
                    await until(0.65)
                    drained = next(n for n in ("n1", "n2", "n3") if n != busiest)
                    nodes.signal(drained, signal.SIGTERM)
                    report.events.append(f"drain {drained} at {len(acked):,}")
                    log(report.events[-1])
                    await until(0.8)
                    await nodes.start(nursery, busiest)
                    report.restarted_recovered = nodes.recovered[busiest]
                    report.events.append(
                        f"{busiest} restarted on its data directory at {len(acked):,}: "
                        f"recovered {nodes.recovered[busiest]:,} records from disk"
                    )
                    log(report.events[-1])

                async with trio.open_nursery() as load:
                    for i in range(producers):
                        load.start_soon(producer, f"p{i + 1}")
                    load.start_soon(faults)
                report.acknowledged = len(acked)
                log(f"{len(acked):,} acknowledged; waiting for the group to consume them")
                with trio.move_on_after(120):
                    while not acked <= seen.keys():
                        await trio.sleep(0.2)
                group.cancel_scope.cancel()
        report.delivered = sum(seen.values())
        report.consumed_unique = len(acked & seen.keys())
        missing = sorted(acked - seen.keys())
        report.lost = len(missing)
        report.lost_examples = missing[:5]
        report.duplicates = report.delivered - len(seen)
        await nodes.aclose()
        nursery.cancel_scope.cancel()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    started = time.monotonic()
    report = trio.run(lambda: run(messages=args.messages))
    print("\n".join(report.lines()) + f"\n[{time.monotonic() - started:.0f} s]")
    sys.exit(1 if report.lost or report.out_of_order else 0)


if __name__ == "__main__":
    main()
