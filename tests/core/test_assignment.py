"""The partition assignment: every guarantee, checked after every step of random histories.

Optimality is checked exactly, not against a heuristic: a map moves the fewest replicas (and
changes the fewest leaders) that reach balance iff the residual graph of the corresponding
min-cost flow has no negative cycle, which Bellman-Ford decides on these small maps.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterkit._core.assignment import (
    MapStats,
    NodeSpec,
    assign,
    balance,
    count_leader_changes,
    count_moves,
    map_stats,
    minimum_moves,
)

Map = Mapping[int, Sequence[str]]
POOL = [f"n{i}" for i in range(10)]
PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- checkers -------------------------------------------------------------------------------


def check_map(new: Map, nodes: Sequence[str], partitions: int, replica_factor: int) -> None:
    """Counts, distinctness, membership and (unweighted) balance."""
    k = min(replica_factor, len(nodes))
    assert sorted(new) == list(range(partitions))
    for row in new.values():
        assert len(row) == k
        assert len(set(row)) == k
        assert set(row) <= set(nodes)
    replica_spread, leader_spread = balance(new, nodes)
    assert replica_spread <= 1
    assert leader_spread <= 1


def kept_rows(old: Map | None, nodes: Sequence[str], k: int) -> dict[int, list[str]]:
    """The previous replicas a new map may keep: active, distinct, at most k per row."""
    active = set(nodes)
    rows: dict[int, list[str]] = {}
    for p, row in (old or {}).items():
        kept: list[str] = []
        for node in row:
            if node in active and node not in kept and len(kept) < k:
                kept.append(node)
        rows[p] = kept
    return rows


def has_negative_cycle(vertices: int, edges: list[tuple[int, int, int]]) -> bool:
    dist = [0] * vertices
    for _ in range(vertices):
        changed = False
        for u, v, w in edges:
            if dist[u] + w < dist[v]:
                dist[v] = dist[u] + w
                changed = True
        if not changed:
            return False
    return True


def moves_are_minimal(old: Map | None, new: Map, nodes: Sequence[str], replica_factor: int) -> bool:
    """No balanced map keeps more of ``old`` than ``new`` does (exact, via the residual graph).

    Flow: partition -> node (cost -1 when the node already held a replica there) -> sink,
    node -> sink within [floor, ceiling] of the mean.
    """
    partitions, n = len(new), len(nodes)
    k = min(replica_factor, n)
    lo, hi = (partitions * k) // n, -(-(partitions * k) // n)
    index = {node: partitions + i for i, node in enumerate(nodes)}
    sink = partitions + n
    kept = kept_rows(old, nodes, k)
    counts = map_stats(new, nodes).replicas
    edges: list[tuple[int, int, int]] = []
    for p, row in new.items():
        for node in nodes:
            cost = -1 if node in kept.get(p, ()) else 0
            if node in row:
                edges.append((index[node], p, -cost))
            else:
                edges.append((p, index[node], cost))
    for node in nodes:
        if counts[node] < hi:
            edges.append((index[node], sink, 0))
        if counts[node] > lo:
            edges.append((sink, index[node], 0))
    return not has_negative_cycle(sink + 1, edges)


def leader_changes_are_minimal(old: Map | None, new: Map, nodes: Sequence[str]) -> bool:
    """Given ``new``'s replica sets, no balanced choice of leaders changes fewer of them."""
    partitions, n = len(new), len(nodes)
    lo, hi = partitions // n, -(-partitions // n)
    index = {node: partitions + i for i, node in enumerate(nodes)}
    sink = partitions + n
    counts = map_stats(new, nodes).leaders
    edges: list[tuple[int, int, int]] = []
    for p, row in new.items():
        before = (old or {}).get(p, ())
        previous_leader = before[0] if before else None
        for node in row:
            cost = -1 if node == previous_leader else 0
            if node == row[0]:
                edges.append((index[node], p, -cost))
            else:
                edges.append((p, index[node], cost))
    for node in nodes:
        if counts[node] < hi:
            edges.append((index[node], sink, 0))
        if counts[node] > lo:
            edges.append((sink, index[node], 0))
    return not has_negative_cycle(sink + 1, edges)


# -- properties -----------------------------------------------------------------------------

steps = st.lists(st.frozensets(st.integers(0, len(POOL) - 1), min_size=1, max_size=3), max_size=8)


@PROPERTY_SETTINGS
@given(
    partitions=st.sampled_from([1, 2, 3, 5, 8, 12, 16]),
    replica_factor=st.integers(1, 4),
    history=steps,
)
def test_random_joins_and_leaves_keep_every_guarantee(
    partitions: int, replica_factor: int, history: list[frozenset[int]]
) -> None:
    nodes: list[str] = []
    current: dict[int, tuple[str, ...]] | None = None
    for toggles in history:
        before = list(nodes)
        for i in sorted(toggles):  # each step joins absent nodes and removes present ones
            if POOL[i] in nodes:
                nodes.remove(POOL[i])
            else:
                nodes.append(POOL[i])
        new = assign(current, nodes, partitions, replica_factor)
        assert new == assign(current, list(reversed(nodes)), partitions, replica_factor)
        if not nodes:
            assert new == {p: () for p in range(partitions)}
            current = new
            continue
        check_map(new, nodes, partitions, replica_factor)
        moves = count_moves(current, new)
        bound = minimum_moves(current, nodes, partitions, replica_factor)
        assert moves >= bound
        assert moves_are_minimal(current, new, nodes, replica_factor)
        assert leader_changes_are_minimal(current, new, nodes)
        joined, left = set(nodes) - set(before), set(before) - set(nodes)
        if current is not None and before and not left:
            # A join moves replicas only onto the new nodes, and exactly the bound.
            assert moves == bound
            for p, row in new.items():
                assert set(row) - set(current[p]) <= joined
        if current is not None and left and not joined and moves == bound:
            # A leave (whenever the bound is reachable) moves only the leavers' replicas.
            for p, row in current.items():
                assert set(row) - set(new[p]) <= left
        current = new


@PROPERTY_SETTINGS
@given(
    partitions=st.sampled_from([4, 9, 16, 24]),
    replica_factor=st.integers(1, 3),
    zones=st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=len(POOL)),
    history=steps,
)
def test_zones_never_cost_a_move_or_break_the_counts(
    partitions: int, replica_factor: int, zones: list[str | None], history: list[frozenset[int]]
) -> None:
    specs = {POOL[i]: NodeSpec(zone=zones[i % len(zones)]) for i in range(len(POOL))}
    nodes: list[str] = []
    current: dict[int, tuple[str, ...]] | None = None
    for toggles in history:
        for i in sorted(toggles):
            if POOL[i] in nodes:
                nodes.remove(POOL[i])
            else:
                nodes.append(POOL[i])
        new = assign(current, {n: specs[n] for n in nodes}, partitions, replica_factor)
        if nodes:
            check_map(new, nodes, partitions, replica_factor)
            assert moves_are_minimal(current, new, nodes, replica_factor)
            assert leader_changes_are_minimal(current, new, nodes)
        current = new


@PROPERTY_SETTINGS
@given(
    partitions=st.sampled_from([1, 5, 16, 60]),
    replica_factor=st.integers(1, 3),
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0, 10.0]), min_size=1, max_size=6),
)
def test_weighted_counts_are_proportional(
    partitions: int, replica_factor: int, weights: list[float]
) -> None:
    nodes = {f"w{i}": NodeSpec(weight=w) for i, w in enumerate(weights)}
    new = assign(None, nodes, partitions, replica_factor)
    k = min(replica_factor, len(nodes))
    for row in new.values():
        assert len(set(row)) == len(row) == k
    stats = map_stats(new, nodes)
    replica_quota = water_fill(partitions * k, weights, [partitions] * len(weights))
    replicas = [stats.replicas[f"w{i}"] for i in range(len(weights))]
    leader_quota = water_fill(partitions, weights, replicas)
    for i in range(len(weights)):
        assert abs(replicas[i] - replica_quota[i]) < 1
        assert abs(stats.leaders[f"w{i}"] - leader_quota[i]) < 1


def water_fill(total: int, weights: list[float], caps: list[int]) -> list[float]:
    shares = [0.0] * len(weights)
    free = set(range(len(weights)))
    remaining = float(total)
    while free:
        wsum = sum(weights[i] for i in free)
        capped = {i for i in free if remaining * weights[i] / wsum > caps[i] + 1e-9}
        if not capped:
            for i in free:
                shares[i] = remaining * weights[i] / wsum
            return shares
        for i in capped:
            shares[i] = caps[i]
            remaining -= caps[i]
        free -= capped
    return shares


# -- examples -------------------------------------------------------------------------------


def test_cold_start_three_nodes() -> None:
    nodes = ["a", "b", "c"]
    new = assign(None, nodes, 256, 3)
    check_map(new, nodes, 256, 3)
    assert all(set(row) == set(nodes) for row in new.values())
    assert sorted(map_stats(new).leaders.values()) == [85, 85, 86]
    assert count_moves(None, new) == minimum_moves(None, nodes, 256, 3) == 768
    assert count_leader_changes(None, new) == 256


def test_replica_factor_above_node_count() -> None:
    new = assign(None, ["a", "b", "c"], 16, 5)
    check_map(new, ["a", "b", "c"], 16, 5)
    assert all(len(row) == 3 for row in new.values())
    grown = assign(new, ["a", "b", "c", "d", "e", "f"], 16, 5)
    check_map(grown, ["a", "b", "c", "d", "e", "f"], 16, 5)
    assert count_moves(new, grown) == minimum_moves(new, ["a", "b", "c", "d", "e", "f"], 16, 5)


def test_single_node() -> None:
    new = assign(None, ["only"], 8, 3)
    assert new == {p: ("only",) for p in range(8)}
    assert balance(new) == (0, 0)


def test_fewer_partitions_than_nodes() -> None:
    nodes = [f"n{i}" for i in range(10)]
    new = assign(None, nodes, 4, 3)
    check_map(new, nodes, 4, 3)
    stats = map_stats(new, nodes)
    assert sorted(stats.replicas.values()) == [1] * 8 + [2] * 2
    assert sorted(stats.leaders.values()) == [0] * 6 + [1] * 4


def test_all_nodes_leave_then_one_joins() -> None:
    first = assign(None, ["a", "b", "c"], 32, 2)
    empty = assign(first, [], 32, 2)
    assert empty == {p: () for p in range(32)}
    assert minimum_moves(first, [], 32, 2) == 0
    back = assign(empty, ["d"], 32, 2)
    assert back == {p: ("d",) for p in range(32)}
    assert count_moves(empty, back) == minimum_moves(empty, ["d"], 32, 2) == 32


def test_result_does_not_depend_on_node_order() -> None:
    nodes = [f"node-{i}" for i in range(17)]
    base = assign(None, nodes, 512, 3)
    for seed in range(3):
        shuffled = list(nodes)
        random.Random(seed).shuffle(shuffled)
        assert assign(None, shuffled, 512, 3) == base
        grown = [*shuffled, "node-x"]
        assert assign(base, grown, 512, 3) == assign(base, sorted(grown), 512, 3)
    specs = {n: NodeSpec(zone=f"z{i % 3}") for i, n in enumerate(nodes)}
    reordered = dict(reversed(list(specs.items())))
    assert assign(None, specs, 128, 3) == assign(None, reordered, 128, 3)


def test_result_does_not_depend_on_the_process_hash_seed() -> None:
    code = (
        "from clusterkit._core.assignment import assign\n"
        "m = assign(None, [f'n{i}' for i in range(7)], 64, 3)\n"
        "print(sorted(assign(m, [f'n{i}' for i in range(1, 9)], 64, 3).items()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**env, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1


def test_previous_leader_stays_when_balance_allows() -> None:
    nodes = ["a", "b", "c", "d"]
    first = assign(None, nodes, 64, 3)
    again = assign(first, nodes, 64, 3)
    assert again == first
    assert count_moves(first, again) == count_leader_changes(first, again) == 0


def test_join_and_leave_at_scale() -> None:
    nodes = [f"node-{i}" for i in range(100)]
    first = assign(None, nodes, 4096, 3)
    check_map(first, nodes, 4096, 3)
    joined = assign(first, [*nodes, "node-new"], 4096, 3)
    check_map(joined, [*nodes, "node-new"], 4096, 3)
    assert count_moves(first, joined) == minimum_moves(first, [*nodes, "node-new"], 4096, 3)
    assert all(set(joined[p]) - set(first[p]) <= {"node-new"} for p in range(4096))
    # The newcomer needs floor(4096 / 101) = 40 leaderships; taking them changes 40 leaders.
    assert count_leader_changes(first, joined) == 40
    rest = nodes[:50] + nodes[51:]
    left = assign(first, rest, 4096, 3)
    check_map(left, rest, 4096, 3)
    assert count_moves(first, left) == minimum_moves(first, rest, 4096, 3) == 123
    assert all(set(first[p]) - set(left[p]) <= {"node-50"} for p in range(4096))


def test_unreachable_bound_costs_the_exact_minimum() -> None:
    # n4 leaves. n9 must grow by one, but it already sits in every row n4 leaves open and
    # the two rows without n9 are full: some replica must shift to make room for it.
    previous = {
        0: ("n8", "n3", "n1", "n6"),
        1: ("n3", "n4", "n9", "n8"),
        2: ("n6", "n3", "n4", "n9"),
        3: ("n1", "n3", "n6", "n8"),
        4: ("n4", "n1", "n6", "n9"),
    }
    nodes = ["n1", "n3", "n6", "n8", "n9"]
    new = assign(previous, nodes, 5, 4)
    check_map(new, nodes, 5, 4)
    assert minimum_moves(previous, nodes, 5, 4) == 3
    assert count_moves(previous, new) == 4
    assert moves_are_minimal(previous, new, nodes, 4)


def test_previous_map_with_strangers_is_cleaned() -> None:
    previous: dict[int, tuple[str, ...]] = {
        0: ("gone", "a", "a", "b"),
        1: ("b",),
        7: ("a", "b"),  # partition out of range
        -1: ("a",),
    }
    new = assign(previous, ["a", "b"], 2, 2)
    check_map(new, ["a", "b"], 2, 2)
    assert count_moves(previous, new) == minimum_moves(previous, ["a", "b"], 2, 2) == 1


def test_zones_make_rows_span_zones() -> None:
    specs = {f"n{i}": NodeSpec(zone=f"z{i % 3}") for i in range(9)}
    new = assign(None, specs, 256, 3)
    check_map(new, list(specs), 256, 3)
    assert all(len({specs[n].zone for n in row}) == 3 for row in new.values())
    # Two zones for three replicas: every row repeats a zone, and counts stay exact.
    two = {f"n{i}": NodeSpec(zone=f"z{i % 2}") for i in range(6)}
    new = assign(None, two, 64, 3)
    check_map(new, list(two), 64, 3)
    assert all(len({two[n].zone for n in row}) == 2 for row in new.values())


def test_zoneless_nodes_mix_with_zoned_ones() -> None:
    specs = {"a": NodeSpec(zone="z1"), "b": NodeSpec(zone="z1"), "c": NodeSpec(), "d": NodeSpec()}
    new = assign(None, specs, 32, 2)
    check_map(new, list(specs), 32, 2)
    assert not any(set(row) == {"a", "b"} for row in new.values())


def test_weights_are_proportional() -> None:
    specs = {"a": NodeSpec(weight=1), "b": NodeSpec(weight=2), "c": NodeSpec(weight=3)}
    stats = map_stats(assign(None, specs, 600, 2))
    assert stats.replicas == {"a": 200, "b": 400, "c": 600}
    assert stats.leaders == {"a": 100, "b": 200, "c": 300}
    # A weight beyond one replica per partition is capped; the others share the rest.
    heavy = {"a": NodeSpec(weight=1), "b": NodeSpec(weight=100), "c": NodeSpec(weight=1)}
    stats = map_stats(assign(None, heavy, 100, 2))
    assert stats.replicas == {"a": 50, "b": 100, "c": 50}


def test_statistics_helpers() -> None:
    new = {0: ("a", "b"), 1: ("a", "c"), 2: ("b", "a")}
    stats = map_stats(new, ["a", "b", "c", "idle"])
    assert stats == MapStats(
        replicas={"a": 3, "b": 2, "c": 1, "idle": 0}, leaders={"a": 2, "b": 1, "c": 0, "idle": 0}
    )
    assert (stats.replica_spread, stats.leader_spread) == (3, 2)
    assert balance(new) == (2, 2)
    assert balance({}) == (0, 0)
    assert count_moves({0: ("a", "b")}, {0: ("b", "c"), 1: ("a",)}) == 2
    assert count_leader_changes({0: ("a", "b"), 1: ("c",)}, {0: ("b", "a"), 1: ("c",)}) == 1


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        assign(None, ["a"], 0, 1)
    with pytest.raises(ValueError):
        assign(None, ["a"], 4, 0)
    with pytest.raises(ValueError):
        assign(None, ["a", "a"], 4, 1)
    with pytest.raises(TypeError):
        assign(None, "abc", 4, 1)
    with pytest.raises(ValueError):
        NodeSpec(weight=0)
    with pytest.raises(ValueError):
        NodeSpec(weight=math.inf)


@pytest.mark.slow
def test_large_map_is_fast() -> None:
    # The target is well under a second; the bound here only catches an O(P*N) regression.
    nodes = [f"node-{i}" for i in range(1000)]
    started = time.perf_counter()
    first = assign(None, nodes, 65536, 3)
    joined = assign(first, [*nodes, "node-new"], 65536, 3)
    elapsed = time.perf_counter() - started
    assert balance(joined) == (1, 1)
    assert count_moves(first, joined) == minimum_moves(first, [*nodes, "node-new"], 65536, 3)
    assert elapsed < 10
