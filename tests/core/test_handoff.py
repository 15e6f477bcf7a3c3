"""Two-phase handoff planning (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from clusterkit._core.handoff import commit_ready, joining, plan
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
