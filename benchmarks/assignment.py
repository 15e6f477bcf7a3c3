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

A second table (``python benchmarks/assignment.py map`` prints only this one) is what the
coordinator and every node pay per map at P = 4096, 16384, 65536 (R = 3, a join of one node
to N): the stored map's size, encode, decode (cold: a new node table; warm: a map of the
same table, as the commit maps of one join are), the coordinator's per-view check
(``covers`` and readiness) and a commit step, each next to the code path they replaced
(format 1 and the O(P) checks, kept below as ``old_*``). Times are the best of a few runs.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import sys
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from clusterkit._core import records
from clusterkit._core.assignment import (
    assign,
    balance,
    count_leader_changes,
    count_moves,
    minimum_moves,
)
from clusterkit._core.handoff import MapSummary, ReadyTracker, commit_ready, joining, plan
from clusterkit._core.keys import valid_node_id
from clusterkit._core.records import MapRecord, decode_map, encode_map

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


# -- the map's cost: today's code next to the code it replaced ---------------------------------


def old_encode_map(record: MapRecord) -> bytes:
    """Format 1: a node table and a list of index lists, pending as an object."""
    table = sorted(record.node_ids())
    index = {nid: i for i, nid in enumerate(table)}
    return json.dumps(
        {
            "format": 1,
            "version": record.version,
            "partitions": record.partitions,
            "replica_factor": record.replica_factor,
            "nodes": table,
            "replicas": [[index[n] for n in row] for row in record.replicas],
            "pending": {str(pt): [index[n] for n in row] for pt, row in record.pending.items()},
        },
        separators=(",", ":"),
    ).encode()


def _old_row(obj: Any, table: Sequence[str]) -> tuple[str, ...]:
    if not isinstance(obj, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(table) for i in obj
    ):
        raise ValueError("bad row")
    if len(set(obj)) != len(obj):
        raise ValueError("node twice")
    return tuple(table[i] for i in obj)


def old_decode_map(value: bytes) -> MapRecord:
    """The format-1 decoder as it was: every row validated in Python, O(P x R)."""
    obj = json.loads(value)
    p, r, table = obj["partitions"], obj["replica_factor"], obj["nodes"]
    if not all(isinstance(n, str) and valid_node_id(n) for n in table):
        raise ValueError("bad table")
    replicas = tuple(_old_row(row, table) for row in obj["replicas"])
    if any(len(row) > r for row in replicas):
        raise ValueError("row too long")
    pending = {int(k): _old_row(row, table) for k, row in obj["pending"].items()}
    return MapRecord(obj["version"], p, r, replicas, pending)


def old_covers(record: MapRecord, placeable: frozenset[str], alive: Collection[str]) -> bool:
    """The coordinator's per-view check as it was: O(P) on every view."""
    want = min(R, len(placeable))
    for pt, row in enumerate(record.replicas):
        intended = record.pending.get(pt, row)
        if len(intended) != want or any(n not in placeable for n in intended):
            return False
        if any(n not in alive for n in row):
            return False
    return record.node_ids() - placeable <= frozenset() and all(
        any(n in r for r in (*record.replicas, *record.pending.values())) for n in placeable
    )


def old_commit_ready(
    previous: MapRecord, alive: Collection[str], ready: Collection[tuple[int, str]]
) -> MapRecord | None:
    """The commit step as it was: a frozenset copy of every marker and a scan of all of them."""
    ready_set = frozenset(ready)
    replicas, pending = list(previous.replicas), dict(previous.pending)
    committed = []
    for pt, goal in previous.pending.items():
        if any(n not in alive for n in goal):
            continue
        current = tuple(n for n in previous.replicas[pt] if n in alive)
        if not current or all((pt, n) in ready_set for n in goal if n not in current):
            replicas[pt] = goal
            del pending[pt]
            committed.append(pt)
    record = MapRecord(previous.version + 1, previous.partitions, R, tuple(replicas), pending)
    sorted(
        (pt, n)
        for pt, n in ready_set
        if n not in record.replicas[pt] and n not in record.pending.get(pt, ())
    )
    return record if committed else None


def best_ms(
    fn: Callable[[], object], runs: int = 5, setup: Callable[[], object] | None = None
) -> float:
    best = float("inf")
    for _ in range(runs):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def _cold_cache() -> None:
    records._ROWS_CACHE = records._Rows((), 1)  # a benchmark measures the cold path


MAP_HEADER = [
    "P",
    "N",
    "moving",
    "KB old/new",
    "encode ms old/new",
    "decode ms old/new cold/warm",
    "covers ms old/new (+per map)",
    "ready check ms old/new",
    "commit ms old/new",
    "plan ms",
]


def map_row(partitions: int, n: int) -> list[str]:
    nodes = [f"node-{i:02d}" for i in range(n)]
    joined = [*nodes, "node-new"]
    before = plan(None, nodes, (), (), partitions, R).record
    plan_ms = best_ms(lambda: plan(before, joined, (), (), partitions, R), runs=2)
    record = plan(before, joined, (), (), partitions, R).record
    markers = {(pt, m) for pt, row in enumerate(record.replicas) for m in row}
    half = sorted(record.pending)[: len(record.pending) // 2]
    ready = frozenset(markers | {(pt, m) for pt in half for m in joining(record, pt)})
    old_raw, new_raw = old_encode_map(record), encode_map(record)
    alive = frozenset(joined)
    tracker = ReadyTracker(record)
    tracker.all_ready(ready)
    summary = MapSummary.of(record)
    decode_cold = best_ms(lambda: decode_map(new_raw), setup=_cold_cache)
    decode_map(new_raw)
    decode_warm = best_ms(lambda: decode_map(new_raw))
    return [
        f"{partitions}",
        f"{n}+1",
        f"{len(record.pending)}",
        f"{len(old_raw) / 1024:.0f}/{len(new_raw) / 1024:.0f}",
        f"{best_ms(lambda: old_encode_map(record)):.1f}/{best_ms(lambda: encode_map(record)):.1f}",
        f"{best_ms(lambda: old_decode_map(old_raw)):.1f}/{decode_cold:.1f}/{decode_warm:.1f}",
        f"{best_ms(lambda: old_covers(record, alive, alive)):.2f}/"
        f"{best_ms(lambda: summary.covers(alive, alive, frozenset(), R)):.3f}"
        f" (+{best_ms(lambda: MapSummary.of(record)):.1f})",
        f"{best_ms(lambda: old_commit_ready(record, alive, ready)):.1f}/"
        f"{best_ms(lambda: (len(ready), tracker.all_ready(ready))):.3f}",
        f"{best_ms(lambda: old_commit_ready(record, alive, ready)):.1f}/"
        f"{best_ms(lambda: commit_ready(record, alive, ready)):.1f}",
        f"{plan_ms:.0f}",
    ]


def map_costs() -> None:
    print(
        f"\nThe map's cost per step (R={R}, a join of one node; old = the replaced code path;"
        " 'ready check' is what the coordinator runs per view while moves are pending: the"
        " old code ran a full commit_ready on every view)"
    )
    rows = [map_row(p, n) for p in (4096, 16384, 65536) for n in (8, 64)]
    widths = [max(len(cells[i]) for cells in [MAP_HEADER, *rows]) for i in range(len(MAP_HEADER))]
    for cells in [MAP_HEADER, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))


def main() -> None:
    if sys.argv[1:] == ["map"]:
        map_costs()
        return
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
    map_costs()


if __name__ == "__main__":
    main()
