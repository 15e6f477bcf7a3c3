"""The rebalance debouncer (pure; time is an argument)."""

from __future__ import annotations

from clusterkit._core.debounce import Debouncer


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
