"""Partition migration between two node *processes*, peers vs gRPC vs raw TCP, same run.

Run: ``python benchmarks/migration_processes.py [--keys N] [--large N]``. Starts an embedded
etcd, a source node in its own process (``_migration_source.py``) and the receiving node in
this one, as users deploy them (one process per node: no GIL shared between the two ends; on a
2-core machine the two processes and etcd share the cores). Moves partition 0 (``--keys``
entries of a 10-byte key and a 100-byte value) and partition 1 (``--large`` entries of 64 KiB
values):

* ``ck.migration.pull`` over the peer transport and over gRPC (the source's MigrationService),
  each with its default batches (256 KiB over peers, 1 MiB over gRPC), and over peers with
  1 MiB batches (the raw baseline's size);
* ``ck.migration.push`` from the source process, over peers and over gRPC;
* raw Trio TCP, length-prefixed msgpack batches of the same data (the baseline).

The goal of issue 13: a gRPC pull of 64 KiB values at least 0.5x raw TCP; small keys at least
200k keys/s. MB are 10**6 bytes of keys and values. Takes about 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import trio

import clusterkit
from clusterkit._migration.wire import MigrationEntry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from migration import count_raw_batches

HERE = os.path.dirname(os.path.abspath(__file__))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=300_000, help="100-byte values")
    parser.add_argument("--large", type=int, default=3_000, help="64 KiB values")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (median shown)")
    args = parser.parse_args()
    counts = {0: args.keys, 1: args.large}
    sizes = {0: args.keys * (10 + 100), 1: args.large * (10 + 64 * 1024)}
    received = [0]
    pushed = trio.Event()

    async def sink(partition: int, entries: list[MigrationEntry]) -> None:
        received[0] += len(entries)
        if received[0] >= counts[partition]:
            pushed.set()

    async with clusterkit.open_embedded_etcd() as etcd:
        prefix = f"/bench-migration-{os.getpid()}"
        config = clusterkit.Config(
            node_id="dst",
            etcd_endpoints=etcd.endpoints,
            etcd_prefix=prefix,
            http_port=0,
            grpc_port=0,
            metrics_port=None,
            partitions=8,
            replica_factor=2,
            rebalance_delay=0.2,
        )
        child = await trio.lowlevel.open_process(
            [
                sys.executable,
                os.path.join(HERE, "_migration_source.py"),
                "--etcd",
                ",".join(etcd.endpoints),
                "--prefix",
                prefix,
                "--keys",
                str(args.keys),
                "--large",
                str(args.large),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None and child.stdin is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                chunk = await child.stdout.receive_some(4096)
                assert chunk, "the source process exited"
                line += chunk
        raw_port = json.loads(line)["raw"]
        async with clusterkit.open_cluster(config) as ck:
            ck.migration.sink(sink)
            with trio.fail_after(30):
                await ck._views.wait_for(lambda v: "src" in v.nodes)

            async def pull(pt: int, transport: str) -> None:
                received[0] = 0
                transport, _, mib = transport.partition(":")
                batch = int(mib) << 20 if mib else None  # None: the transport's default
                progress = await ck.migration.pull(
                    pt, "src", sink, transport=transport, batch_bytes=batch
                )
                assert progress.keys == counts[pt]

            async def push(pt: int, transport: str) -> None:
                received[0] = 0
                pushed_keys = await ck.peers.request(
                    "src", "bench.push", [pt, transport], timeout=300
                )
                assert pushed_keys == counts[pt] and received[0] == counts[pt]

            async def raw(pt: int, _: str) -> None:
                async with await trio.open_tcp_stream("127.0.0.1", raw_port) as conn:
                    await conn.send_all(bytes([pt]))
                    count = await count_raw_batches(conn)
                assert count == counts[pt]

            rows: list[tuple[str, Callable[[int, str], Awaitable[None]], str]] = [
                ("raw Trio TCP, msgpack batches", raw, ""),
                ("ck.migration.pull, peers", pull, "peer"),
                ("ck.migration.pull, gRPC", pull, "grpc"),
                ("ck.migration.pull, peers, 1 MiB", pull, "peer:1"),
                ("ck.migration.push, peers", push, "peer"),
                ("ck.migration.push, gRPC", push, "grpc"),
            ]
            print(
                f"{args.keys:,} keys of 100 B and {args.large:,} of 64 KiB over loopback; source "
                f"and receiver in separate processes; median of {args.repeat}"
            )
            print(f"{'':32} {'100 B values':>19}   {'64 KiB values':>19}   {'vs raw TCP':>10}")
            print(
                f"{'transfer':32} {'keys/s':>10} {'MB/s':>8}   {'keys/s':>10} {'MB/s':>8}"
                f"   {'small':>4} {'large':>5}"
            )
            baseline: dict[int, float] = {}
            for name, run, transport in rows:
                cells = []
                ratios = []
                for pt in (0, 1):
                    times = []
                    for _ in range(args.repeat):
                        started = time.perf_counter()
                        with trio.fail_after(300):
                            await run(pt, transport)
                        times.append(time.perf_counter() - started)
                    elapsed = sorted(times)[len(times) // 2]
                    rate = sizes[pt] / elapsed
                    baseline.setdefault(pt, rate)
                    ratios.append(rate / baseline[pt])
                    cells.append(f"{counts[pt] / elapsed:>10,.0f} {rate / 1e6:>8.1f}")
                print(f"{name:32} {cells[0]}   {cells[1]}   {ratios[0]:>4.2f} {ratios[1]:>5.2f}")
        await child.stdin.aclose()
        with trio.move_on_after(10):
            await child.wait()
        if child.returncode is None:
            child.kill()


if __name__ == "__main__":
    trio.run(main)
