"""Ignored keys are logged once per kind, then summarised at most once per interval."""

from __future__ import annotations

import logging

import pytest

from clusterkit._core.problems import ProblemLog


def test_twenty_thousand_junk_keys_give_a_handful_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    problems = ProblemLog(logging.getLogger("t"), "clusterkit n1", clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        for i in range(20_000):
            problems.report("unknown", f"unknown key /ck/junk/{i}")
            if i == 3:
                problems.report("node", "/ck/nodes/x: node record is not JSON")
            if i == 10_000:
                now[0] = 61.0  # a minute later: one summary, then quiet again
        lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "unknown key /ck/junk/0" in lines[0] and "node record is not JSON" in lines[1]
    assert "unknown=" in lines[2] and "totals: node=1, unknown=10002" in lines[2]
    assert problems.statistics() == {"garbage_unknown": 20_000, "garbage_node": 1}
