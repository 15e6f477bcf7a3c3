"""Partition migration throughput over loopback, against raw baselines in the same run.

Run: ``python benchmarks/migration.py [--keys N] [--large N]``. Starts an embedded etcd and two
nodes in this process (so sender and receiver share one CPU, as two nodes on one core would)
and moves the same data eight ways:

* ``ck.migration.pull``: the migration service, default batching (1000 keys / 256 KiB);
* the same over gRPC (the source node's ``MigrationService``, batched), and
  ``ck.migration.push`` over the peer transport and over gRPC;
* the same, rate limited (``rate_keys`` / ``rate_bytes``): the measured rate should sit just
  under the limit;
* ``ck.peers.stream``, one stream item per key-value: the peer transport without batching;
* ``ck.peers.stream``, the migration's batches pre-built: the transport with batching but no
  source contract checks, decoding or sink;
* raw Trio TCP, length-prefixed msgpack batches: no websocket, no credit, no checks.

Small: ``--keys`` entries of a 10-byte key and a 100-byte value; large: ``--large`` entries of a
10-byte key and a 64 KiB value. MB are 10**6 bytes of keys and values. Takes about 15 s.
"""

from __future__ import annotations

import argparse
import bisect
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import msgpack
import trio

import clusterkit
from clusterkit._migration.wire import MigrationEntry, SourceRequest
from clusterkit._peers.session import PeerStream

Run = Callable[[list[MigrationEntry]], Awaitable[None]]


def make_data(n: int, value_size: int) -> list[MigrationEntry]:
    value = b"v" * value_size
    return [MigrationEntry(b"k%09d" % i, value) for i in range(n)]


def batches(data: list[MigrationEntry], keys: int, nbytes: int) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = [[]]
    size = 0
    for e in data:
        n = len(e.key) + len(e.value)
        if out[-1] and (len(out[-1]) >= keys or size + n > nbytes):
            out.append([])
            size = 0
        out[-1].append({"key": e.key, "value": e.value})
        size += n
    return out


async def count_raw_batches(conn: trio.abc.ReceiveStream) -> int:
    """The keys in the length-prefixed msgpack batches read from ``conn`` until EOF (the raw
    TCP baseline's receiving side)."""
    count = 0
    buffer = bytearray()
    while chunk := await conn.receive_some(1 << 20):
        buffer += chunk
        while len(buffer) >= 4:
            (size,) = struct.unpack_from(">I", buffer)
            if len(buffer) < 4 + size:
                break
            count += len(msgpack.unpackb(bytes(buffer[4 : 4 + size]))["kvs"])
            del buffer[: 4 + size]
    return count


class Bench:
    def __init__(self, src: clusterkit.ClusterKit, dst: clusterkit.ClusterKit) -> None:
        self.src, self.dst = src, dst
        self.data: list[MigrationEntry] = []
        self.keys: list[bytes] = []
        self.received = 0
        src.migration.source(self._source)
        dst.migration.sink(self._sink)
        src.peers.add_stream_handler("bench.items", self._items)
        src.peers.add_stream_handler("bench.batches", self._batches)

    def use(self, data: list[MigrationEntry]) -> None:
        self.data, self.keys = data, [e.key for e in data]

    async def _source(self, request: SourceRequest) -> AsyncIterator[MigrationEntry]:
        after = request.after
        for e in self.data[0 if after is None else bisect.bisect_right(self.keys, after) :]:
            yield e

    async def _items(self, stream: PeerStream, payload: Any) -> None:
        for e in self.data:
            await stream.send({"key": e.key, "value": e.value})

    async def _batches(self, stream: PeerStream, payload: Any) -> None:
        for kvs in batches(self.data, 1000, 1 << 20):
            await stream.send({"partition": 0, "kvs": kvs, "resume_token": kvs[-1]["key"]})

    async def _sink(self, partition: int, entries: list[MigrationEntry]) -> None:
        self.received += len(entries)

    async def pull(self, **limits: Any) -> None:
        progress = await self.dst.migration.pull(0, "src", self._sink, **limits)
        assert progress.keys == len(self.data)

    async def pull_grpc(self) -> None:
        progress = await self.dst.migration.pull(0, "src", self._sink, transport="grpc")
        assert progress.keys == len(self.data)

    async def push(self, transport: str) -> None:
        progress = await self.src.migration.push(0, "dst", transport=transport)
        assert progress.keys == len(self.data) and progress.complete

    async def stream(self, method: str) -> None:
        count = 0
        async with self.dst.peers.stream("src", method) as s:
            async for item in s:
                count += len(item["kvs"]) if "kvs" in item else 1
        assert count == len(self.data)

    async def raw_tcp(self) -> None:
        async def serve(conn: trio.SocketStream) -> None:
            async with conn:
                for kvs in batches(self.data, 1000, 1 << 20):
                    body = msgpack.packb({"kvs": kvs}, use_bin_type=True)
                    await conn.send_all(struct.pack(">I", len(body)) + body)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            async with await trio.open_tcp_stream("127.0.0.1", port) as conn:
                count = await count_raw_batches(conn)
            nursery.cancel_scope.cancel()
        assert count == len(self.data)


async def timed(run: Callable[[], Awaitable[None]], data: list[MigrationEntry]) -> str:
    start = trio.current_time()
    with trio.fail_after(30):
        await run()
    elapsed = trio.current_time() - start
    nbytes = sum(len(e.key) + len(e.value) for e in data)
    return f"{len(data) / elapsed:>10,.0f} {nbytes / elapsed / 1e6:>8.1f}"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=300_000, help="100-byte values")
    parser.add_argument("--large", type=int, default=3_000, help="64 KiB values")
    args = parser.parse_args()
    small = make_data(args.keys, 100)
    large = make_data(args.large, 64 * 1024)
    rate_keys, rate_bytes = 50_000, 32_000_000

    async with clusterkit.open_embedded_etcd() as etcd, trio.open_nursery() as nursery:
        cks: dict[str, clusterkit.ClusterKit] = {}
        ready = trio.Event()

        async def node(name: str) -> None:
            config = clusterkit.Config(
                node_id=name,
                etcd_endpoints=etcd.endpoints,
                http_port=0,
                partitions=8,
                replica_factor=2,
                rebalance_delay=0.2,
                metrics_port=None,
                grpc_port=0,
            )
            async with clusterkit.open_cluster(config) as ck:
                cks[name] = ck
                if len(cks) == 2:
                    ready.set()
                await trio.sleep_forever()

        nursery.start_soon(node, "src")
        nursery.start_soon(node, "dst")
        with trio.fail_after(20):
            await ready.wait()
            await cks["dst"]._views.wait_for(lambda v: "src" in v.nodes)
        bench = Bench(cks["src"], cks["dst"])

        rows: list[tuple[str, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = [
            ("ck.migration.pull", bench.pull, bench.pull),
            ("ck.migration.pull, gRPC", bench.pull_grpc, bench.pull_grpc),
            ("ck.migration.push", partial(bench.push, "peer"), partial(bench.push, "peer")),
            (
                "ck.migration.push, gRPC",
                partial(bench.push, "grpc"),
                partial(bench.push, "grpc"),
            ),
            (
                "ck.migration.pull, rate limited",
                partial(bench.pull, rate_keys=rate_keys),
                partial(bench.pull, rate_bytes=rate_bytes),
            ),
            (
                "ck.peers.stream, 1 item per key",
                partial(bench.stream, "bench.items"),
                partial(bench.stream, "bench.items"),
            ),
            (
                "ck.peers.stream, pre-built batches",
                partial(bench.stream, "bench.batches"),
                partial(bench.stream, "bench.batches"),
            ),
            ("raw Trio TCP, msgpack batches", bench.raw_tcp, bench.raw_tcp),
        ]
        print(
            f"{len(small):,} keys of 100 B and {len(large):,} of 64 KiB over loopback, "
            f"two nodes in one process (limits: {rate_keys:,} keys/s, {rate_bytes / 1e6:.0f} MB/s)"
        )
        print(f"{'':36} {'100 B values':>19}   {'64 KiB values':>19}")
        print(f"{'transfer':36} {'keys/s':>10} {'MB/s':>8}   {'keys/s':>10} {'MB/s':>8}")
        for name, run_small, run_large in rows:
            bench.use(small)
            a = await timed(run_small, small)
            bench.use(large)
            b = await timed(run_large, large)
            print(f"{name:36} {a}   {b}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
