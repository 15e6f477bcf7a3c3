"""Cold start to a converged map, and etcd writes per join, on an embedded etcd.

Run: ``python benchmarks/cluster.py [--delay SECONDS]``. For each P: starts three nodes at
once and times how long until every node sees a map covering all three (goal: at most
rebalance_delay + 1 s), then adds a fourth node and counts the etcd revisions the join cost
(every etcd write is one revision; goal: a small constant, not proportional to P).
"""

from __future__ import annotations

import argparse

import trio

import clusterkit


async def measure(partitions: int, delay: float) -> tuple[float, int, int]:
    async with clusterkit.open_embedded_etcd() as etcd:
        async with (
            clusterkit.open_etcd_client(etcd.endpoints) as client,
            trio.open_nursery() as nursery,
        ):
            cks: dict[str, clusterkit.ClusterKit] = {}

            async def node(name: str) -> None:
                cfg = clusterkit.Config(
                    node_id=name,
                    etcd_endpoints=etcd.endpoints,
                    http_port=0,
                    partitions=partitions,
                    rebalance_delay=delay,
                    metrics_port=None,
                    grpc_port=0,
                )
                async with clusterkit.open_cluster(cfg) as ck:
                    cks[name] = ck
                    await trio.sleep_forever()

            start = trio.current_time()
            for i in range(3):
                nursery.start_soon(node, f"n{i}")
            with trio.fail_after(delay + 30):
                while len(cks) < 3:
                    await trio.sleep(0.001)
                for ck in list(cks.values()):
                    await ck.wait_converged({"n0", "n1", "n2"})
            cold = trio.current_time() - start

            before = (await client.status()).raft_index
            rev_before = (await client.get_prefix("/clusterkit/")).revision
            nursery.start_soon(node, "n3")
            with trio.fail_after(delay + 30):
                while len(cks) < 4:
                    await trio.sleep(0.001)
                for ck in list(cks.values()):
                    await ck.wait_converged({"n0", "n1", "n2", "n3"})
            rev_after = (await client.get_prefix("/clusterkit/")).revision
            raft = (await client.status()).raft_index - before
            nursery.cancel_scope.cancel()
    return cold, rev_after - rev_before, raft


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=5.0, help="rebalance_delay (s)")
    parser.add_argument("--partitions", type=int, nargs="+", default=[256, 4096])
    args = parser.parse_args()
    print(f"rebalance_delay = {args.delay} s; goal: cold start <= {args.delay + 1:.1f} s")
    print(f"{'P':>6} {'cold start (s)':>15} {'writes per join':>16} {'raft entries':>13}")
    for p in args.partitions:
        cold, writes, raft = await measure(p, args.delay)
        print(f"{p:6d} {cold:15.2f} {writes:16d} {raft:13d}")


if __name__ == "__main__":
    trio.run(main)
