"""Hook grammar per partition (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from clusterkit._core.hookplan import Role, Track, leadership, transition


def calls_of(track: Track, role: Role, peers: list[str]) -> tuple[Track, list[str]]:
    track, calls = transition(track, role, peers, partition=1, previous_owner="x", new_owner="y")
    return track, [c.hook for c in calls]


def test_join_then_commit_then_leave() -> None:
    t, c = calls_of(Track(), Role.JOINING, [])
    assert c == ["assigned"]
    t, c = calls_of(t, Role.REPLICA, ["a", "b"])
    assert c == []  # the commit itself needs no hook
    t, c = calls_of(t, Role.REPLICA, ["a", "c"])
    assert c == ["replica_removed", "replica_added"]
    t, lead = leadership(t, True, 1)
    assert [x.hook for x in lead] == ["leader_elected"]
    t, c = calls_of(t, Role.NONE, [])
    assert c == ["leader_lost", "unassigned"]
    assert t == Track()


def test_a_replica_demoted_to_joining_is_unassigned_and_pulls_again() -> None:
    t, _ = calls_of(Track(), Role.REPLICA, ["a"])
    t, _ = leadership(t, True, 1)
    t, c = calls_of(t, Role.JOINING, [])
    assert c == ["leader_lost", "unassigned", "assigned"]
    assert t.assigned and not t.leading and t.role is Role.JOINING


def test_elected_needs_assigned_and_never_twice() -> None:
    t, lead = leadership(Track(), True, 1)
    assert lead == []
    t, _ = calls_of(Track(), Role.REPLICA, [])
    t, first = leadership(t, True, 1)
    t, second = leadership(t, True, 1)
    assert len(first) == 1 and second == []
    t, lost = leadership(t, False, 1)
    t, again = leadership(t, False, 1)
    assert len(lost) == 1 and again == []


@given(st.lists(st.sampled_from(["none", "joining", "replica", "win", "lose"]), max_size=40))
def test_any_sequence_of_changes_gives_a_well_formed_hook_sequence(ops: list[str]) -> None:
    track, seen = Track(), []
    for op in ops:
        if op in ("win", "lose"):
            track, calls = leadership(track, op == "win", 1)
        else:
            track, calls = transition(
                track, Role(op), ["p"], partition=1, previous_owner=None, new_owner=None
            )
        seen += [
            c.hook
            for c in calls
            if c.hook in ("assigned", "leader_elected", "leader_lost", "unassigned")
        ]
    # assigned (elected lost)* [elected] unassigned, repeated
    state = "out"
    for hook in seen:
        match state, hook:
            case "out", "assigned":
                state = "in"
            case "in", "leader_elected":
                state = "lead"
            case "lead", "leader_lost":
                state = "in"
            case "in", "unassigned":
                state = "out"
            case _:
                raise AssertionError(f"{hook} in state {state}: {seen}")
