"""Routing reads: ``ck.get_partition`` and ``ck.get_replicas`` against bare baselines.

Run: ``python benchmarks/routing.py``. Starts an embedded etcd and three nodes (P=256, R=3),
waits for the map, then times the routing calls of one node in a tight loop, next to the
bare expression they wrap, measured in the same process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import mmh3
import trio

import clusterkit

N = 1_000_000
P = 256


def per_call_ns(fn: Callable[[Any], object], args: Sequence[Any], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for a in args:
            fn(a)
        best = min(best, (time.perf_counter_ns() - start) / len(args))
    return best


async def main() -> None:
    async with clusterkit.open_embedded_etcd() as etcd:
        async with trio.open_nursery() as nursery:
            cks: list[clusterkit.ClusterKit] = []

            async def node(name: str, task_status: trio.TaskStatus[None]) -> None:
                cfg = clusterkit.Config(
                    node_id=name,
                    etcd_endpoints=etcd.endpoints,
                    http_port=0,
                    partitions=P,
                    rebalance_delay=0.1,
                    metrics_port=None,
                    grpc_port=0,
                )
                async with clusterkit.open_cluster(cfg) as ck:
                    cks.append(ck)
                    task_status.started()
                    await trio.sleep_forever()

            for i in range(3):
                await nursery.start(node, f"n{i}")
            ck = cks[0]
            with trio.fail_after(30):
                await ck.wait_converged({"n0", "n1", "n2"})

            keys = [f"user:{i}" for i in range(N // 10)]
            bare_mmh3 = per_call_ns(lambda k: mmh3.hash(k, signed=False) % P, keys)
            partition = per_call_ns(ck.get_partition, keys)
            pts = [i % P for i in range(N // 10)]
            bare_tuple = per_call_ns(lambda pt: list(ck.view.replica_nodes[pt]), pts)
            replicas = per_call_ns(ck.get_replicas, pts)
            is_replica = per_call_ns(ck.is_replica, pts)
            nursery.cancel_scope.cancel()

    rows = [
        ("get_partition(str key)", partition, bare_mmh3, "mmh3.hash(k) % P", "<= 2x"),
        ("get_replicas(pt)", replicas, bare_tuple, "list(view.rows[pt])", "< 300 ns"),
        ("is_replica(pt)", is_replica, bare_tuple, "list(view.rows[pt])", "-"),
    ]
    print(f"{'call':26} {'ns/call':>9} {'baseline':>9} {'ratio':>6}  baseline expr          goal")
    for name, ns, base, expr, goal in rows:
        print(f"{name:26} {ns:9.0f} {base:9.0f} {ns / base:6.2f}  {expr:22} {goal}")


if __name__ == "__main__":
    trio.run(main)
