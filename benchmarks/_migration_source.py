"""The source node of ``benchmarks/migration_processes.py``, in its own process.

Serves partition 0 (``--keys`` entries of 100 B values) and partition 1 (``--large`` entries of
64 KiB values) through ``ck.migration`` (peers and gRPC), pushes a partition to the puller's
node on request (``bench.push``: ``[partition, transport]``), and serves the same data as raw
length-prefixed msgpack batches on a TCP port (the first byte the client sends picks the
partition). Prints one JSON line with that port, then runs until stdin closes.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import struct
import sys
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import msgpack
import trio

import clusterkit
from clusterkit._migration.wire import MigrationEntry, SourceRequest

sys.path.insert(0, os.path.dirname(__file__))
from migration import batches, make_data


async def main(args: argparse.Namespace) -> None:
    data = {0: make_data(args.keys, 100), 1: make_data(args.large, 64 * 1024)}
    keys = {pt: [e.key for e in entries] for pt, entries in data.items()}
    config = clusterkit.Config(
        node_id="src",
        etcd_endpoints=args.etcd.split(","),
        etcd_prefix=args.prefix,
        http_port=0,
        grpc_port=0,
        metrics_port=None,
        partitions=8,
        replica_factor=2,
        rebalance_delay=0.2,
    )

    async def source(request: SourceRequest) -> AsyncIterator[MigrationEntry]:
        entries, index = data[request.partition], keys[request.partition]
        start = 0 if request.after is None else bisect.bisect_right(index, request.after)
        for e in entries[start:]:
            yield e

    async def serve_raw(conn: trio.SocketStream) -> None:
        async with conn:
            pt = (await conn.receive_some(1))[0]
            for kvs in batches(data[pt], 1000, 1 << 20):
                body = msgpack.packb({"kvs": kvs}, use_bin_type=True)
                await conn.send_all(struct.pack(">I", len(body)) + body)

    async with clusterkit.open_cluster(config) as ck, trio.open_nursery() as nursery:
        ck.migration.source(source)

        async def push(payload: Any) -> int:
            pt, transport = payload
            transport, _, mib = transport.partition(":")
            batch = int(mib) << 20 if mib else None
            progress = await ck.migration.push(pt, "dst", transport=transport, batch_bytes=batch)
            return progress.keys

        ck.peers.add_handler("bench.push", push)
        listeners = await nursery.start(partial(trio.serve_tcp, serve_raw, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        print(json.dumps({"raw": port}), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with stdin:
            while await stdin.receive_some():
                pass
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--keys", type=int, required=True)
    parser.add_argument("--large", type=int, required=True)
    trio.run(main, parser.parse_args())
