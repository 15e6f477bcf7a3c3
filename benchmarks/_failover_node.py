"""One clusterkit node in its own process, for ``benchmarks/failover.py`` (it SIGKILLs it).

Run by the benchmark as a fresh interpreter (``python benchmarks/_failover_node.py ...``),
never forked. It joins the cluster at ``--endpoint``/``--prefix``, prints ``ready <node_id>``
on stdout once it is registered, and then stays in the cluster until it is killed, its stdin
closes (the benchmark went away) or ``--max-seconds`` pass, whichever comes first.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import trio

import clusterkit


async def stdin_closed() -> None:
    """Return when stdin reaches EOF (the parent closed the pipe or died)."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        for _ in range(1_000_000):
            if not await stream.receive_some(4096):
                return


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--replica-factor", type=int, default=3)
    parser.add_argument("--session-ttl", type=float, required=True)
    parser.add_argument("--rebalance-delay", type=float, default=0.2)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cfg = clusterkit.Config(
        node_id=args.node_id,
        etcd_endpoints=[args.endpoint],
        etcd_prefix=args.prefix,
        http_port=0,
        partitions=args.partitions,
        replica_factor=args.replica_factor,
        session_ttl=args.session_ttl,
        rebalance_delay=args.rebalance_delay,
        metrics_port=None,
        grpc_port=0,
    )
    with trio.move_on_after(args.max_seconds):
        async with clusterkit.open_cluster(cfg) as ck:
            print(f"ready {ck.node_id}", flush=True)
            await stdin_closed()


if __name__ == "__main__":
    trio.run(main)
