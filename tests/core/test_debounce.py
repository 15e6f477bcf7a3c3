"""The rebalance debouncer (pure; time is an argument)."""

from __future__ import annotations

from clusterkit._core.debounce import CommitPacer, Debouncer, commit_interval


def test_quiet_period_then_act() -> None:
    d = Debouncer(delay=5, max_delay=20)
    assert d.observe(frozenset({"a"}), satisfied=True, now=0) is None
    assert d.observe(frozenset({"a", "b"}), satisfied=False, now=1) == 6
    assert d.observe(frozenset({"a", "b"}), satisfied=False, now=3) == 6  # same target: no reset
    assert (
        d.observe(frozenset({"a", "b", "c"}), satisfied=False, now=4) == 9
    )  # new change: wait again
    d.done()
    assert d.deadline() is None


def test_flap_inside_the_window_cancels() -> None:
    d = Debouncer(delay=5, max_delay=20)
    assert d.observe(frozenset({"a"}), satisfied=False, now=0) == 5
    assert (
        d.observe(frozenset({"a", "b"}), satisfied=True, now=2) is None
    )  # back to what the map has
    assert d.deadline() is None


def test_constant_churn_is_bounded_by_max_delay() -> None:
    d = Debouncer(delay=5, max_delay=12)
    deadline = None
    for t in range(0, 30):
        deadline = d.observe(frozenset({t}), satisfied=False, now=t)
        assert deadline is not None and deadline <= 12
        if t >= deadline:
            break
    assert t == 12


def test_commit_pacer_commits_at_once_when_everything_is_ready() -> None:
    pacer = CommitPacer(interval=0.25)
    assert pacer.observe(progressed=False, complete=False, now=1.0) is None
    assert pacer.observe(progressed=True, complete=True, now=1.5) == 1.5


def test_commit_pacer_batches_a_trickle_into_one_commit_per_window() -> None:
    pacer = CommitPacer(interval=0.25, max_interval=1.0)
    assert pacer.observe(progressed=True, complete=False, now=1.0) == 1.25
    # more markers inside the window do not move it
    assert pacer.observe(progressed=True, complete=False, now=1.1) == 1.25
    assert pacer.observe(progressed=False, complete=False, now=1.2) == 1.25
    pacer.done(committed=False)  # nothing was ready after all: the window stays 0.25 s
    assert pacer.observe(progressed=False, complete=False, now=1.3) is None
    assert pacer.observe(progressed=True, complete=False, now=1.4) == 1.65
    # every partial commit doubles the next window, up to max_interval
    windows = []
    for _ in range(4):
        pacer.done(committed=True)
        windows.append(pacer.observe(progressed=True, complete=False, now=10.0))
    assert windows == [10.5, 11.0, 11.0, 11.0]
    assert pacer.observe(progressed=False, complete=True, now=10.1) == 10.1
    pacer.restart()  # a new plan
    assert pacer.observe(progressed=True, complete=False, now=20.0) == 20.25


def test_commit_interval_grows_with_the_map() -> None:
    assert commit_interval(256) == commit_interval(16384) == 0.25
    assert commit_interval(65536) == 1.0
