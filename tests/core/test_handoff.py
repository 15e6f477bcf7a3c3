"""Two-phase handoff planning (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from clusterkit._core.handoff import (
    MapSummary,
    Plan,
    ReadyTracker,
    commit_ready,
    delete_batches,
    joining,
    plan,
)
from clusterkit._core.records import MapRecord

P, R = 16, 3


def cold(nodes: list[str]) -> MapRecord:
    return plan(None, nodes, (), (), P, R).record


def test_cold_start_commits_at_once() -> None:
    record = cold(["a", "b", "c"])
    assert record.pending == {} and all(len(set(row)) == 3 for row in record.replicas)


def test_join_is_pending_until_every_joining_replica_is_ready() -> None:
    before = cold(["a", "b", "c"])
    step = plan(before, ["a", "b", "c", "d"], (), (), P, R)
    record = step.record
    assert record.replicas == before.replicas  # nothing committed yet: old replicas serve
    assert record.pending and all("d" in row for row in record.pending.values())
    assert all(joining(record, pt) == ("d",) for pt in record.pending)
    assert commit_ready(record, ["a", "b", "c", "d"], ()) is None
    some = sorted(record.pending)[:3]
    partial = commit_ready(record, ["a", "b", "c", "d"], [(pt, "d") for pt in some])
    assert partial is not None and partial.committed == tuple(some)
    assert set(partial.record.pending) == set(record.pending) - set(some)
    assert partial.stale_ready == ()  # d is a replica now: its markers stay
    for pt in some:
        assert partial.record.replicas[pt] == record.pending[pt]
    assert partial.record.version == record.version + 1


def test_a_dead_replica_is_dropped_at_once_and_replaced_through_a_pending_row() -> None:
    before = cold(["a", "b", "c", "d"])
    step = plan(before, ["a", "b", "c"], (), (), P, R)
    for pt, row in enumerate(step.record.replicas):
        assert "d" not in row
        if "d" in before.replicas[pt]:
            assert len(row) == 2 and pt in step.record.pending  # the survivors serve meanwhile
            assert len(step.record.pending[pt]) == 3


def test_draining_node_keeps_serving_until_its_replacement_is_ready() -> None:
    before = cold(["a", "b", "c", "d"])
    step = plan(before, ["a", "b", "c", "d"], ["d"], (), P, R)
    for pt, row in enumerate(step.record.replicas):
        assert row == before.replicas[pt]  # d still committed
        if "d" in row:
            assert "d" not in step.record.pending[pt]
    ready = [(pt, n) for pt in step.record.pending for n in joining(step.record, pt)]
    done = commit_ready(step.record, ["a", "b", "c", "d"], ready)
    assert done is not None and done.record.pending == {}
    assert "d" not in done.record.node_ids()


def test_if_no_old_replica_survives_the_new_ones_commit_at_once() -> None:
    before = cold(["a", "b", "c"])
    step = plan(before, ["x", "y", "z"], (), (), P, R)
    assert step.record.pending == {} and step.record.node_ids() == {"x", "y", "z"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("jld"), st.integers(0, 7)), min_size=1, max_size=12))
def test_planned_changes_never_reduce_serving_replicas(ops: list[tuple[str, int]]) -> None:
    """Joins and drains (planned) never commit a row with fewer live replicas than
    min(before, R, N) — N counting the nodes that stay."""
    nodes = ["n0", "n1", "n2"]
    draining: set[str] = set()
    record = cold(nodes)
    for op, i in ops:
        name = f"n{i}"
        if op == "j" and name not in nodes:
            nodes.append(name)
        elif op == "d" and name in nodes and len(set(nodes) - draining) > 1:
            draining.add(name)
        step = plan(record, nodes, draining, (), P, R)
        staying = len(set(nodes) - draining)
        for pt, row in enumerate(step.record.replicas):
            before = [n for n in record.replicas[pt] if n in nodes]
            assert len(row) >= min(len(before), R, staying)
        # everybody becomes ready: the moves commit
        ready = [(pt, n) for pt in step.record.pending for n in joining(step.record, pt)]
        done = commit_ready(step.record, nodes, ready)
        record = done.record if done is not None else step.record
        placeable = set(nodes) - draining
        want = min(R, len(placeable))
        assert all(len(row) == want for row in record.replicas)
        assert record.node_ids() <= set(nodes)
        nodes = [n for n in nodes if n not in draining or n in record.node_ids()]


# -- back-pressure helpers: covers, trackers, marker deletion --------------------------------


def reference_covers(
    record: MapRecord | None,
    placeable: frozenset[str],
    alive: frozenset[str],
    draining: frozenset[str],
    r: int,
) -> bool:
    """The O(P) check the coordinator ran on every view before MapSummary."""
    if not placeable:
        return True
    if record is None:
        return False
    want = min(r, len(placeable))
    for pt, row in enumerate(record.replicas):
        intended = record.pending.get(pt, row)
        if len(intended) != want or any(n not in placeable for n in intended):
            return False
        if any(n not in alive for n in row):
            return False
    return record.node_ids() - placeable <= draining and all(
        any(n in row for row in (*record.replicas, *record.pending.values())) for n in placeable
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from("abcdef"), min_size=1, max_size=5, unique=True),
    st.lists(st.sampled_from("abcdefg"), max_size=6, unique=True),
    st.lists(st.sampled_from("abcdefg"), max_size=3, unique=True),
    st.integers(0, 3),
    st.lists(st.integers(0, P - 1), max_size=4),
)
def test_summary_covers_matches_the_per_partition_check(
    first: list[str], alive: list[str], draining: list[str], drop: int, moved: list[int]
) -> None:
    record = cold(first)
    if moved:  # some rows in flight to a shuffled or shorter row
        pending = {pt: tuple(reversed(record.replicas[pt]))[: R - drop % 2] for pt in moved}
        record = MapRecord(2, P, R, record.replicas, pending)
    alive_set = frozenset(alive)
    drain = frozenset(draining) & alive_set
    placeable = alive_set - drain
    summary = MapSummary.of(record)
    assert summary.covers(placeable, alive_set, drain, R) == reference_covers(
        record, placeable, alive_set, drain, R
    )


def test_ready_tracker_is_amortized_and_rewinds() -> None:
    before = cold(["a", "b", "c"])
    record = plan(before, ["a", "b", "c", "d"], (), (), P, R).record
    tracker = ReadyTracker(record)
    pairs = [(pt, "d") for pt in sorted(record.pending)]
    assert tracker.announced == len(pairs) and not tracker.all_ready(set())
    assert not tracker.all_ready(set(pairs[:-1]))
    assert tracker.all_ready(set(pairs))
    assert tracker.all_ready(set())  # it remembers: commit_ready re-checks the markers
    tracker.rewind()
    assert not tracker.all_ready(set(pairs[1:]))


def test_commit_ready_names_the_markers_of_replicas_that_leave() -> None:
    before = cold(["a", "b", "c"])
    step = plan(before, ["a", "b", "c", "d"], (), (), P, R)
    record = step.record
    old_markers = {(pt, n) for pt in range(P) for n in record.replicas[pt]}
    ready = old_markers | {(pt, "d") for pt in record.pending}
    done = commit_ready(record, ["a", "b", "c", "d"], ready)
    assert done is not None and set(done.committed) == set(record.pending)
    leaving = {(pt, n) for pt in record.pending for n in record.replicas[pt]} - {
        (pt, n) for pt in record.pending for n in record.pending[pt]
    }
    assert set(done.stale_ready) == leaving and done.delete_first == ()


def test_a_marker_the_stored_map_did_not_announce_goes_first() -> None:
    """A marker left from an abandoned move must be gone before a map announces that move
    again, or the next plan would count it before the hook ran."""
    before = cold(["a", "b", "c"])
    step = plan(before, ["a", "b", "c", "d"], (), (), P, R)
    pt = min(step.record.pending)
    leftover = {(pt, "d")}  # d wrote a marker for pt under an older, abandoned map
    again = plan(before, ["a", "b", "c", "d"], (), leftover, P, R)
    assert again.delete_first == ((pt, "d"),) and (pt, "d") in again.stale_ready
    assert pt in again.record.pending  # not committed on the leftover marker
    # A marker the stored map announced counts, and is not deleted.
    counted = plan(step.record, ["a", "b", "c", "d"], (), leftover, P, R)
    assert pt in counted.committed and counted.delete_first == ()


def test_delete_batches_respect_max_txn_ops() -> None:
    record = cold(["a", "b", "c"])
    first = tuple((pt, "x") for pt in range(300))
    later = tuple((pt, "y") for pt in range(200))
    step = Plan(record, tuple(sorted(first + later)), (), first)
    before, with_map, after = delete_batches(step, 128)
    assert all(len(batch) <= 128 for batch in (*before, *after)) and len(with_map) <= 127
    done_before = {m for batch in before for m in batch} | set(with_map)
    assert set(first) <= done_before  # never after the map
    assert sorted(done_before | {m for batch in after for m in batch}) == sorted(first + later)
    assert [len(b) for b in before] == [128, 128] and len(with_map) == 127
    small = Plan(record, later[:5], (), ())
    assert delete_batches(small, 128) == ([], list(later[:5]), [])


def test_moves_commit_at_p_4096_in_one_step_when_all_are_ready() -> None:
    nodes = [f"n{i}" for i in range(8)]
    p = 4096
    before = plan(None, nodes, (), (), p, R).record
    step = plan(before, [*nodes, "new"], (), (), p, R)
    record = step.record
    assert len(record.pending) >= p * R // 9 - 1 and not step.committed
    ready = frozenset((pt, "new") for pt in record.pending)
    assert ReadyTracker(record).all_ready(ready)
    done = commit_ready(record, [*nodes, "new"], ready)
    assert done is not None and done.record.pending == {}
    assert MapSummary.of(done.record).covers(
        frozenset([*nodes, "new"]), frozenset([*nodes, "new"]), frozenset(), R
    )
