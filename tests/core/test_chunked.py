"""Copy-on-write chunked maps: every snapshot equals a plain dict copy taken at that moment."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from clusterkit._core.chunked import (
    CHUNK,
    ChunkedMapBuilder,
    ReadyMarkersBuilder,
    frozen_map,
    frozen_ready,
)

keys = st.integers(min_value=0, max_value=5 * CHUNK)
ops = st.lists(st.tuples(st.booleans(), keys, st.integers()), max_size=200)


@given(st.lists(ops, min_size=1, max_size=6))
def test_snapshots_are_immutable_and_equal_a_dict_copy(
    rounds: list[list[tuple[bool, int, int]]],
) -> None:
    builder: ChunkedMapBuilder[int] = ChunkedMapBuilder()
    model: dict[int, int] = {}
    snapshots = []
    for round_ops in rounds:
        for put, key, value in round_ops:
            if put:
                builder.set(key, value)
                model[key] = value
            else:
                assert builder.pop(key) == model.pop(key, None)
        snapshots.append((builder.freeze(), dict(model)))
    for snap, expected in snapshots:  # earlier snapshots never see later writes
        assert dict(snap.items()) == expected
        assert len(snap) == len(expected)
        for key in range(5 * CHUNK + 2):
            assert snap.get(key) == expected.get(key)
            assert (key in snap) == (key in expected)
        assert list(snap) == sorted(expected)


def test_reads_of_keys_that_are_not_partitions_miss() -> None:
    snap = frozen_map({0: "a", CHUNK - 1: "b"})
    assert snap.get(-1) is None and -1 not in snap  # never wraps around to the last chunk
    assert snap.get(10**9) is None and "0" not in snap  # type: ignore[comparison-overlap]
    assert snap[0] == "a" and snap.get(1, "dflt") == "dflt"


def test_a_snapshot_shares_untouched_chunks() -> None:
    builder: ChunkedMapBuilder[str] = ChunkedMapBuilder()
    for pt in range(4 * CHUNK):
        builder.set(pt, "x")
    first = builder.freeze()
    builder.set(1, "y")
    second = builder.freeze()
    assert first.get(1) == "x" and second.get(1) == "y"
    shared = [a is b for a, b in zip(first._chunks, second._chunks, strict=True)]
    assert shared == [False, True, True, True]
    assert builder.freeze() is second  # nothing changed: the same snapshot


@given(st.lists(st.tuples(st.booleans(), keys, st.sampled_from("abc")), max_size=200))
def test_ready_markers_behave_like_a_frozenset(ops: list[tuple[bool, int, str]]) -> None:
    builder = ReadyMarkersBuilder()
    model: set[tuple[int, str]] = set()
    for add, pt, node in ops:
        if add:
            builder.add(pt, node)
            model.add((pt, node))
        else:
            builder.discard(pt, node)
            model.discard((pt, node))
    snap = builder.freeze()
    assert snap == frozenset(model) and len(snap) == len(model)  # type: ignore[comparison-overlap]
    assert set(snap) == model
    for pt in range(5 * CHUNK + 1):
        assert snap.nodes(pt) == {n for p, n in model if p == pt}
    assert frozen_ready(frozenset(model)) == snap
    assert ("x", "a") not in snap and (1,) not in snap  # type: ignore[comparison-overlap]
