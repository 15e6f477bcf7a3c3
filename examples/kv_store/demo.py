"""The KV store demo: 3 node processes, 10,000 keys, a SIGKILLed leader, a new node, a
drained node, a frozen node, and a check that no acknowledged write was lost.

Run from the repository root: ``python -m examples.kv_store.demo`` (``--help`` for sizes).
It starts an embedded etcd, starts the nodes as separate processes
(``examples/kv_store/node.py``), and talks to them only through ``clusterkit.open_client``:

1. write every key once, and SIGKILL the node leading the most partitions a third of the
   way through (the writes go on: they retry until a new leader takes them);
2. start a fourth node and, while it pulls its partitions, overwrite half of the keys and
   delete some; then drain another node (SIGTERM: it hands its partitions off and leaves),
   then freeze the new node (SIGSTOP) for three session TTLs and let it wake (it has missed
   writes, rejoins and re-syncs), all under rounds of overwrites and deletes;
3. read every key back from the leaders and compare it with the last acknowledged write.

A write whose acknowledgement never came may or may not have been applied; the check
accepts either outcome for it, but an *acknowledged* value must be there — ``lost`` counts
the keys where it is not, and must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import clusterkit

ROOT = Path(__file__).resolve().parents[2]
WRITE_DEADLINE = 30.0  # a single write keeps retrying this long before it counts as failed
RETRYABLE = {"ReplicationFailed", "StaleEpoch", "UnknownMethod"}


@dataclass
class Report:
    keys: int = 0
    writes_attempted: int = 0
    writes_acknowledged: int = 0
    writes_unacknowledged: int = 0
    deletes_acknowledged: int = 0
    verified: int = 0
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    killed: str = ""
    killed_led: int = 0
    failover_seconds: float = 0.0
    drained: str = ""
    paused: str = ""
    added: str = ""
    overwrite_rounds: int = 0
    max_write_seconds: float = 0.0
    retries: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    holdings: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [
            f"keys                     {self.keys}",
            f"writes attempted         {self.writes_attempted}",
            f"writes acknowledged      {self.writes_acknowledged} "
            f"(deletes {self.deletes_acknowledged})",
            f"writes not acknowledged  {self.writes_unacknowledged}",
            f"keys verified            {self.verified}",
            f"keys lost                {self.lost}",
            f"killed (SIGKILL)         {self.killed} (led {self.killed_led} partitions)",
            f"failover                 {self.failover_seconds:.2f} s until every partition "
            "had a live leader again",
            f"added / drained / paused {self.added} / {self.drained} / {self.paused} (under "
            f"{self.overwrite_rounds} rounds of overwrites and deletes)",
            f"slowest write            {self.max_write_seconds:.2f} s (retries {self.retries})",
            "phases                   "
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()),
        ]


class NodeProcess:
    """A node of the store in its own process; it exits when our end of its stdin closes."""

    def __init__(self, node_id: str, args: list[str]) -> None:
        self.node_id = node_id
        self.args = args
        self.process: trio.Process | None = None
        self.up = trio.Event()
        self.exited = trio.Event()
        self.events: list[dict[str, Any]] = []

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        command = [
            sys.executable,
            "-m",
            "examples.kv_store.node",
            "--id",
            self.node_id,
            "--parent-stdin",
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = await trio.lowlevel.open_process(
            command + self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=str(ROOT),
            env=env,
        )
        task_status.started()
        assert self.process.stdout is not None
        buffer = b""
        try:
            async for chunk in self.process.stdout:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    self.events.append(event)
                    if event.get("event") == "up":
                        self.up.set()
            await self.process.wait()
        finally:
            self.exited.set()

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signum)

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.stdin is not None:
            await self.process.stdin.aclose()  # the node leaves when its stdin closes
        with trio.move_on_after(5):
            await self.exited.wait()
        self.signal(signal.SIGKILL)


class Writer:
    """Writes through the routing client and remembers what was acknowledged."""

    def __init__(self, client: clusterkit.RoutingClient, report: Report) -> None:
        self.client = client
        self.report = report
        self.acked: dict[str, bytes | None] = {}
        self.maybe: dict[str, list[bytes | None]] = {}

    async def write(self, key: str, value: bytes | None) -> bool:
        r = self.report
        r.writes_attempted += 1
        method = "kv.put" if value is not None else "kv.delete"
        payload = {"k": key, "v": value} if value is not None else {"k": key}
        start = trio.current_time()
        with trio.move_on_after(WRITE_DEADLINE):
            while True:
                try:
                    await self.client.request(key, method, payload)
                    break
                except clusterkit.RemoteError as exc:
                    if exc.remote_type not in RETRYABLE:
                        raise
                except (clusterkit.NotLeader, clusterkit.PeerError, clusterkit.EtcdError):
                    pass
                r.retries += 1
                await trio.sleep(0.05)
            r.max_write_seconds = max(r.max_write_seconds, trio.current_time() - start)
            r.writes_acknowledged += 1
            r.deletes_acknowledged += value is None
            self.acked[key] = value
            self.maybe.pop(key, None)
            return True
        r.writes_unacknowledged += 1
        self.maybe.setdefault(key, []).append(value)
        return False

    async def write_all(self, items: list[tuple[str, bytes | None]], concurrency: int) -> None:
        """Write ``items``; one task per key slice, so each key's writes stay in order."""

        async def worker(part: list[tuple[str, bytes | None]]) -> None:
            for key, value in part:
                await self.write(key, value)

        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                nursery.start_soon(worker, items[i::concurrency])


async def wait_until(what: str, condition: Any, timeout: float) -> None:
    """Poll ``condition()`` until true (a demo, not a test: polling the client view is fine)."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


def healthy(client: clusterkit.RoutingClient, nodes: set[str]) -> bool:
    view = client.view
    if view.map is None or view.active_node_ids() != nodes:
        return False
    if view.map.pending or not view.converged(min(3, len(nodes))):
        return False
    return all(
        (leader := client.get_leader(pt)) is not None and leader.id in nodes
        for pt in range(view.map.partitions)
    )


async def run(
    *,
    keys: int = 10_000,
    partitions: int = 64,
    concurrency: int = 64,
    session_ttl: float = 2.0,
    rebalance_delay: float = 1.0,
    echo: bool = True,
) -> Report:
    """Run the demo; returns the report (``lost`` must be 0)."""
    report = Report(keys=keys)
    say = print if echo else (lambda *_: None)
    with tempfile.TemporaryDirectory(prefix="kvstore-etcd-") as data_dir:
        async with clusterkit.open_embedded_etcd(data_dir=data_dir) as etcd:
            endpoints = ",".join(etcd.endpoints)
            common = [
                "--etcd",
                endpoints,
                "--prefix",
                "/kvstore",
                "--partitions",
                str(partitions),
                "--session-ttl",
                str(session_ttl),
                "--rebalance-delay",
                str(rebalance_delay),
            ]
            nodes = {n: NodeProcess(n, common) for n in ("n1", "n2", "n3", "n4")}
            async with trio.open_nursery() as nursery:
                try:
                    await _scenario(
                        nursery, nodes, etcd.endpoints, report, say, keys, concurrency, session_ttl
                    )
                finally:
                    with trio.CancelScope(shield=True):
                        for node in nodes.values():
                            await node.stop()
                    nursery.cancel_scope.cancel()
    return report


async def _scenario(
    nursery: trio.Nursery,
    nodes: dict[str, NodeProcess],
    endpoints: tuple[str, ...],
    report: Report,
    say: Any,
    keys: int,
    concurrency: int,
    session_ttl: float,
) -> None:
    t0 = trio.current_time()
    for name in ("n1", "n2", "n3"):
        await nursery.start(nodes[name].run)
    config = clusterkit.ClientConfig(
        etcd_endpoints=list(endpoints), etcd_prefix="/kvstore", request_timeout=5.0
    )
    async with clusterkit.open_client(config) as client:
        await wait_until("3 nodes", lambda: healthy(client, {"n1", "n2", "n3"}), 60)
        report.phases["start"] = trio.current_time() - t0
        say(f"3 nodes up, every partition led ({report.phases['start']:.1f} s)")
        writer = Writer(client, report)
        names = [f"key-{i:05d}" for i in range(keys)]

        # -- phase 1: write every key; SIGKILL the busiest leader a third of the way in -------
        t1 = trio.current_time()
        killed = trio.Event()

        async def killer() -> None:
            await wait_until("a third", lambda: report.writes_acknowledged >= keys // 3, 120)
            led = Counter(
                leader.id
                for pt in range(partitions_of(client))
                if (leader := client.get_leader(pt)) is not None
            )
            victim, count = led.most_common(1)[0]
            report.killed, report.killed_led = victim, count
            say(
                f"SIGKILL {victim} (leads {count} partitions) "
                f"after {report.writes_acknowledged} acks"
            )
            start = trio.current_time()
            nodes[victim].signal(signal.SIGKILL)
            survivors = {"n1", "n2", "n3"} - {victim}
            await wait_until(
                "failover",
                lambda: all(
                    (leader := client.get_leader(pt)) is not None and leader.id in survivors
                    for pt in range(partitions_of(client))
                ),
                60,
            )
            report.failover_seconds = trio.current_time() - start
            say(f"every partition led by a survivor again after {report.failover_seconds:.2f} s")
            killed.set()

        async with trio.open_nursery() as phase:
            phase.start_soon(killer)
            await writer.write_all([(k, f"v1-{k}".encode()) for k in names], concurrency)
        report.phases["write+kill"] = trio.current_time() - t1
        say(f"phase 1: {report.writes_acknowledged} of {keys} writes acknowledged")

        # -- phase 2: add n4 and drain another node while overwriting and deleting ------------
        t2 = trio.current_time()
        survivors = sorted({"n1", "n2", "n3"} - {report.killed})
        await nursery.start(nodes["n4"].run)
        report.added = "n4"
        drained = survivors[0]
        report.drained = drained
        churned = trio.Event()

        async def churn() -> None:
            await wait_until("n4 joined", lambda: healthy(client, {*survivors, "n4"}), 120)
            say(f"n4 joined and holds its partitions ({trio.current_time() - t2:.1f} s)")
            nodes[drained].signal(signal.SIGTERM)
            with trio.fail_after(120):
                await nodes[drained].exited.wait()
            rest = {*survivors, "n4"} - {drained}
            await wait_until("drained", lambda: healthy(client, rest), 120)
            say(f"{drained} drained and left ({trio.current_time() - t2:.1f} s)")
            # Freeze a node (SIGSTOP) for three session TTLs: the others take over its
            # leaderships and count it dead; when it wakes it has missed writes, rejoins and
            # must re-sync before it serves again.
            frozen = report.paused = "n4"
            say(
                f"freezing {frozen} for {3 * session_ttl:.0f} s (SIGSTOP): expect its warnings"
                " on waking ('keepalives stopped', 'session lost; rejoining'): it was counted"
                " dead, rejoins under a new session and re-syncs before it serves"
            )
            nodes[frozen].signal(signal.SIGSTOP)
            await trio.sleep(3 * session_ttl)
            nodes[frozen].signal(signal.SIGCONT)
            await wait_until("woke", lambda: healthy(client, rest), 120)
            say(f"{frozen} paused {3 * session_ttl:.0f} s, woke and re-synced")
            churned.set()

        async def overwrite() -> None:
            # Rounds over half of the keys (1 in 20 deleted) until the churn is over, so the
            # join and the drain both happen under writes.
            version = 2
            while True:
                await writer.write_all(
                    [
                        (k, None if (i + version) % 20 == 0 else f"v{version}-{k}".encode())
                        for i, k in enumerate(names[::2])
                    ],
                    concurrency,
                )
                report.overwrite_rounds += 1
                if churned.is_set():
                    return
                version += 1

        async with trio.open_nursery() as phase:
            phase.start_soon(churn)
            phase.start_soon(overwrite)
        report.phases["add+drain+overwrite"] = trio.current_time() - t2

        # -- phase 3: read everything back ----------------------------------------------------
        t3 = trio.current_time()
        await verify(client, writer, names, report, concurrency)
        report.phases["verify"] = trio.current_time() - t3
        for node_id in sorted(client.view.nodes):
            report.holdings[node_id] = await client_stats(client, node_id)


def partitions_of(client: clusterkit.RoutingClient) -> int:
    view = client.view
    return view.map.partitions if view.map is not None else 0


async def client_stats(client: clusterkit.RoutingClient, node_id: str) -> Any:
    return await client.call(node_id, "kv.stats", timeout=5)


async def verify(
    client: clusterkit.RoutingClient,
    writer: Writer,
    names: list[str],
    report: Report,
    concurrency: int,
) -> None:
    async def read(key: str) -> bytes | None:
        with trio.fail_after(WRITE_DEADLINE):
            while True:
                try:
                    answer = await client.request(key, "kv.get", {"k": key})
                    return answer["v"] if answer["found"] else None
                except (clusterkit.NotLeader, clusterkit.PeerError) as exc:
                    if isinstance(exc, clusterkit.RemoteError) and exc.remote_type not in RETRYABLE:
                        raise
                await trio.sleep(0.05)

    async def worker(part: list[str]) -> None:
        for key in part:
            value = await read(key)
            allowed = list(writer.maybe.get(key, []))
            if key in writer.acked:
                allowed.append(writer.acked[key])
                if value in allowed:
                    report.verified += 1
                else:
                    report.lost += 1
                    if len(report.lost_examples) < 5:
                        report.lost_examples.append(
                            f"{key}: read {value!r}, acked {writer.acked[key]!r}"
                        )
            elif value is not None and value not in allowed:
                report.lost += 1  # a value nobody wrote

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(worker, names[i::concurrency])


def main() -> None:
    p = argparse.ArgumentParser(description="clusterkit KV store demo")
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--partitions", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args()
    report = trio.run(
        lambda: run(keys=args.keys, partitions=args.partitions, concurrency=args.concurrency)
    )
    print("\n== kv store report")
    for line in report.lines():
        print("  " + line)
    for node_id, stats in report.holdings.items():
        print(f"  {node_id}: {stats['partitions']} partitions, {stats['keys']} live keys")
    for example in report.lost_examples:
        print("  LOST " + example)
    sys.exit(0 if report.lost == 0 and report.verified > 0 else 1)


if __name__ == "__main__":
    main()
