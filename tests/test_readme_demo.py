"""The README's sample of the KV store demo's report is what the demo prints (issue 12,
item 7): the same lines in the same order, and numbers the demo's arithmetic can produce with
its default sizes (the number of overwrite rounds depends on the machine; the rest follows)."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

from examples.kv_store import demo

README = Path(__file__).resolve().parents[1] / "README.md"
HOLDING = re.compile(r"(n\d+): (\d+) partitions, (\d+) live keys")


def fenced_blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def sample() -> list[str]:
    """The report lines of the README's fenced block that shows the demo's report."""
    found = [
        b
        for b in fenced_blocks(README.read_text())
        if any(x.strip().startswith("keys lost") for x in b)
    ]
    assert len(found) == 1, "the README shows one sample of the demo's report"
    return [x.strip() for x in found[0] if x.strip() and not x.startswith("== ")]


def label(line: str) -> str:
    """The report's labels fill a column of 25 characters."""
    return line[:25].strip()


def test_the_sample_has_the_demos_lines_in_the_demos_order() -> None:
    printed = [label(line) for line in demo.Report().lines()]
    lines = sample()
    assert [label(line) for line in lines[: len(printed)]] == printed
    assert all(HOLDING.fullmatch(line) for line in lines[len(printed) :]), lines


def number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match is not None, (pattern, text)
    return int(match[1])


def test_the_samples_numbers_follow_from_the_demos_defaults() -> None:
    values = {label(line): line[25:].strip() for line in sample()}
    defaults = inspect.signature(demo.run).parameters
    keys = int(values["keys"])
    assert keys == defaults["keys"].default
    rounds = number(r"under (\d+) rounds", values["added / drained / paused"])
    half = math.ceil(keys / 2)  # each round overwrites every other key ...
    deletes_per_round = math.ceil(half / 20)  # ... and deletes one in 20 of those
    attempted = int(values["writes attempted"])
    acked = number(r"^(\d+) ", values["writes acknowledged"])
    deletes = number(r"\(deletes (\d+)\)", values["writes acknowledged"])
    assert attempted == keys + rounds * half
    assert acked + int(values["writes not acknowledged"]) == attempted
    assert deletes <= rounds * deletes_per_round
    assert int(values["keys verified"]) == keys and int(values["keys lost"]) == 0
    holdings = [m for line in sample() if (m := HOLDING.fullmatch(line))]
    assert holdings
    if acked == attempted:  # every write landed: the last round's deletes are what is gone
        assert deletes == rounds * deletes_per_round
        for m in holdings:  # two nodes remain, each a replica of every partition
            assert int(m[2]) == defaults["partitions"].default
            assert int(m[3]) == keys - deletes_per_round
