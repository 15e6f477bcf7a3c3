"""The distributed cache under a read-heavy load, a SIGKILL and a join:
``python -m examples.cache.demo``.

Starts an etcd (the embedded one) and three ``examples.cache.node`` processes, each bounded to
``--max-bytes`` of entries, writes every key once, then runs a load of 90% reads (half from the
leader, half from any replica) and 10% writes (a tenth of them deletes) over a skewed key space
through ``CacheClient``. A third of the way in it SIGKILLs one node; two thirds in, a fourth
node joins (warming up its partitions by migration). The report: hit ratio, stale reads (a read
that returned an older version than a write acknowledged before the read began: must be 0 from
the leader; counted from replicas), latency percentiles, and each node's memory against its
bound.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

import clusterkit
from examples.http_kv.demo import Cluster
from examples.http_kv.http import request

from .client import CacheClient, Version


@dataclass
class Report:
    writes: int = 0
    deletes: int = 0
    reads: dict[str, int] = field(default_factory=lambda: {"leader": 0, "any": 0})
    hits: dict[str, int] = field(default_factory=lambda: {"leader": 0, "any": 0})
    stale: dict[str, int] = field(default_factory=lambda: {"leader": 0, "any": 0})
    wrong: int = 0
    latency: dict[str, list[float]] = field(
        default_factory=lambda: {"leader": [], "any": [], "write": []}
    )
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    killed: str = ""
    joined: str = ""
    retries: int = 0
    max_bytes: int = 0

    def hit_ratio(self) -> float:
        reads = sum(self.reads.values())
        return sum(self.hits.values()) / reads if reads else 0.0

    def lines(self) -> list[str]:
        def pct(kind: str, q: float) -> str:
            data = sorted(self.latency[kind])
            return f"{data[int(q * (len(data) - 1))] * 1000:.1f}" if data else "-"

        out = [
            f"writes acknowledged {self.writes:,} (deletes {self.deletes:,}); "
            f"reads {self.reads['leader']:,} from leaders, {self.reads['any']:,} from any replica",
            f"hit ratio {self.hit_ratio():.1%} (leader {self._ratio('leader'):.1%}, "
            f"any {self._ratio('any'):.1%})",
            f"stale reads: leader {self.stale['leader']} (must be 0), any replica "
            f"{self.stale['any']}; wrong values {self.wrong}",
        ]
        for kind in ("leader", "any", "write"):
            out.append(f"latency {kind:6}: p50 {pct(kind, 0.5)} ms, p99 {pct(kind, 0.99)} ms")
        for node, stats in sorted(self.memory.items()):
            out.append(
                f"{node}: {stats['bytes']:,} of {stats['max_bytes']:,} bytes, "
                f"{stats['entries']:,} entries, {stats['evictions']:,} evicted, "
                f"{stats['expirations']:,} expired"
            )
        out.append(f"SIGKILL {self.killed}, joined {self.joined}; client retries {self.retries}")
        return out

    def _ratio(self, kind: str) -> float:
        return self.hits[kind] / self.reads[kind] if self.reads[kind] else 0.0


async def run(
    *,
    seconds: float = 12.0,
    workers: int = 16,
    keys: int = 5_000,
    max_bytes: int = 2 << 20,
    log: Any = print,
    seed: int | None = None,
) -> Report:
    """The scenario; returns the report (``stale['leader']`` and ``wrong`` must be 0)."""
    rng = random.Random(seed)
    report = Report(max_bytes=max_bytes)
    acked: dict[str, tuple[Version, bytes | None]] = {}
    async with clusterkit.open_embedded_etcd() as etcd, trio.open_nursery() as nursery:
        prefix = f"/cache-demo-{os.getpid()}"
        cluster = Cluster(
            list(etcd.endpoints),
            prefix,
            32,
            module="examples.cache.node",
            extra=("--max-bytes", str(max_bytes)),
        )
        for node_id in ("n1", "n2", "n3"):
            await cluster.start(nursery, node_id)
        log(f"3 cache nodes up, {max_bytes:,} bytes each: {json.dumps(cluster.http)}")
        config = clusterkit.ClientConfig(etcd_endpoints=etcd.endpoints, etcd_prefix=prefix)
        async with clusterkit.open_client(config) as routing:
            with trio.fail_after(60):
                await routing.wait_ready()  # the nodes form the map and elect the leaders
            client = CacheClient(routing)
            stop = 0.0

            def pick() -> str:
                return f"key-{int(keys * rng.random() ** 3):05d}"  # skewed: hot keys

            async def worker() -> None:
                while trio.current_time() < stop:
                    key = pick()
                    roll = rng.random()
                    started = trio.current_time()
                    if roll < 0.1:
                        if roll < 0.01:
                            version = await client.delete(key)
                            value: bytes | None = None
                            report.deletes += 1
                        else:
                            text = f"{key}:{rng.getrandbits(64):x}" * rng.randint(2, 40)
                            version = await client.set(key, text, ttl=rng.uniform(3, 30))
                            value = text.encode()
                        report.writes += 1
                        report.latency["write"].append(trio.current_time() - started)
                        if key not in acked or acked[key][0] < version:
                            acked[key] = (version, value)
                        continue
                    kind = "leader" if roll < 0.55 else "any"
                    floor = acked.get(key)
                    got, seen = await client.get(key, consistency=kind)
                    report.latency[kind].append(trio.current_time() - started)
                    report.reads[kind] += 1
                    if got is None or seen is None:
                        continue
                    report.hits[kind] += 1
                    if floor is not None and seen < floor[0]:
                        report.stale[kind] += 1
                    elif floor is not None and seen == floor[0] and got != floor[1]:
                        report.wrong += 1

            async def faults() -> None:
                await trio.sleep(seconds / 3)
                report.killed = "n2"
                cluster.kill("n2")
                log(f"SIGKILL n2 after {report.writes:,} writes")
                await trio.sleep(seconds / 3)
                report.joined = "n4"
                await cluster.start(nursery, "n4")
                log("n4 joined")

            async def prefill(first: int) -> None:
                for i in range(first, keys, workers):
                    key = f"key-{i:05d}"
                    text = f"{key}:initial" * rng.randint(2, 40)
                    version = await client.set(key, text, ttl=rng.uniform(30, 60))
                    acked[key] = (version, text.encode())

            async with trio.open_nursery() as fill:
                for w in range(workers):
                    fill.start_soon(prefill, w)
            log(f"{keys:,} keys written once; the load starts")
            stop = trio.current_time() + seconds
            async with trio.open_nursery() as load:
                for _ in range(workers):
                    load.start_soon(worker)
                load.start_soon(faults)
            report.retries = client.retries
        for node_id in sorted(cluster.alive):
            _, _, body = await request(f"{cluster.http[node_id]}/stats")
            report.memory[node_id] = json.loads(body)
        await cluster.aclose()
        nursery.cancel_scope.cancel()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--max-bytes", type=int, default=2 << 20)
    parser.add_argument("--keys", type=int, default=5_000)
    args = parser.parse_args()
    report = trio.run(
        lambda: run(
            seconds=args.seconds, workers=args.workers, keys=args.keys, max_bytes=args.max_bytes
        )
    )
    print("\n".join(report.lines()))
    over = [n for n, s in report.memory.items() if s["bytes"] > s["max_bytes"]]
    sys.exit(1 if report.stale["leader"] or report.wrong or over else 0)


if __name__ == "__main__":
    main()
