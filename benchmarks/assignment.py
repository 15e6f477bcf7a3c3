"""The partition assignment against a classic consistent-hash ring.

Run: ``python benchmarks/assignment.py``. For N nodes and P partitions (R=3) it prints, for
our ``assign`` and for a ring with 150 virtual nodes per node (the Go ClusterKit scheme:
ring points ``sha256(f"{node}-{i}")``, partition p's replicas are the first R distinct
nodes clockwise from ``sha256(str(p))``; positions are the first 8 bytes, big-endian):

- replica and leader imbalance of the cold-start map (max - min over the nodes);
- replicas moved when one node joins and when one leaves, with our theoretical minimum
  (``minimum_moves``) next to ours; leader changes of ours;
- the time our ``assign`` takes (cold start, join, leave) and the ring (cold start).

N=1000 with P=256 is skipped: 768 replicas for 1000 nodes leaves nodes empty whatever the
scheme, so balance says nothing. The run stops early (and says so) past ``BUDGET_S``.
"""

from __future__ import annotations

import bisect
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from clusterkit._core.assignment import (
    assign,
    balance,
    count_leader_changes,
    count_moves,
    minimum_moves,
)

R = 3
VNODES = 150
NODE_COUNTS = (3, 10, 100, 1000)
PARTITION_COUNTS = (256, 4096, 65536)
BUDGET_S = 180.0
GOAL_S = 1.0  # P=65536, N=1000

T = TypeVar("T")
Map = dict[int, tuple[str, ...]]


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _position(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def ring_map(nodes: Sequence[str], partitions: int, replicas: int) -> Map:
    points = sorted((_position(f"{node}-{i}"), node) for node in nodes for i in range(VNODES))
    keys = [point for point, _ in points]
    k = min(replicas, len(nodes))
    result: Map = {}
    for p in range(partitions):
        start = bisect.bisect_right(keys, _position(str(p)))
        row: list[str] = []
        step = 0
        while len(row) < k:
            node = points[(start + step) % len(points)][1]
            if node not in row:
                row.append(node)
            step += 1
        result[p] = tuple(row)
    return result


def row_for(n: int, partitions: int) -> list[str]:
    nodes = [f"node-{i}" for i in range(n)]
    joined = [*nodes, "node-new"]
    left = nodes[: n // 2] + nodes[n // 2 + 1 :]

    ours, cold_s = timed(lambda: assign(None, nodes, partitions, R))
    ours_joined, join_s = timed(lambda: assign(ours, joined, partitions, R))
    ours_left, leave_s = timed(lambda: assign(ours, left, partitions, R))
    ring, ring_s = timed(lambda: ring_map(nodes, partitions, R))
    ring_joined = ring_map(joined, partitions, R)
    ring_left = ring_map(left, partitions, R)

    replica_spread, leader_spread = balance(ours, nodes)
    ring_replica_spread, ring_leader_spread = balance(ring, nodes)
    join_min = minimum_moves(ours, joined, partitions, R)
    leave_min = minimum_moves(ours, left, partitions, R)
    return [
        f"{n}",
        f"{partitions}",
        f"{replica_spread}/{leader_spread}",
        f"{count_moves(ours, ours_joined)}/{join_min}",
        f"{count_moves(ours, ours_left)}/{leave_min}",
        f"{count_leader_changes(ours, ours_joined)}/{count_leader_changes(ours, ours_left)}",
        f"{cold_s * 1000:.0f}/{join_s * 1000:.0f}/{leave_s * 1000:.0f}",
        f"{ring_replica_spread}/{ring_leader_spread}",
        f"{count_moves(ring, ring_joined)}",
        f"{count_moves(ring, ring_left)}",
        f"{ring_s * 1000:.0f}",
    ]


HEADER = [
    "N",
    "P",
    "ours Δrepl/Δlead",
    "ours join moves/min",
    "ours leave moves/min",
    "ours lead chg join/leave",
    "ours ms cold/join/leave",
    "ring Δrepl/Δlead",
    "ring join moves",
    "ring leave moves",
    "ring ms",
]


def main() -> None:
    print(f"R={R}; ring: {VNODES} virtual nodes per node, SHA-256. Δ = max - min per node.")
    started = time.perf_counter()
    rows: list[list[str]] = []
    notes: list[str] = []
    for n in NODE_COUNTS:
        for partitions in PARTITION_COUNTS:
            if partitions * R < n:
                notes.append(f"skipped N={n} P={partitions}: P*R < N, some nodes stay empty")
            elif time.perf_counter() - started > BUDGET_S:
                notes.append(f"skipped N={n} P={partitions}: over the {BUDGET_S:.0f} s budget")
            else:
                rows.append(row_for(n, partitions))
    widths = [max(len(cells[i]) for cells in [HEADER, *rows]) for i in range(len(HEADER))]
    for cells in [HEADER, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    nodes = [f"node-{i}" for i in range(1000)]
    best = min(timed(lambda: assign(None, nodes, 65536, R))[1] for _ in range(3))
    verdict = "meets" if best < GOAL_S else "MISSES"
    notes.append(f"P=65536 N=1000 cold start, best of 3: {best:.3f} s ({verdict} the 1 s goal)")
    notes.append(f"total {time.perf_counter() - started:.1f} s")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
