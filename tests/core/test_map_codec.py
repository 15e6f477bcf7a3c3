"""The partition map codec (format 2): round trips, strictness, size and cost bounds."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clusterkit
from clusterkit._config import MAP_REQUEST_LIMIT
from clusterkit._core.handoff import plan
from clusterkit._core.records import (
    MAP_FORMAT,
    MapRecord,
    RecordError,
    decode_map,
    decode_node,
    encode_map,
    map_version_hint,
    max_map_bytes,
)

NODES = [f"n{i}" for i in range(12)]


@st.composite
def records(draw: st.DrawFn) -> MapRecord:
    pool = draw(st.sampled_from([NODES[:3], NODES[:10], NODES[:11], NODES]))
    r = draw(st.integers(1, 4))
    p = draw(st.integers(1, 24))
    row = st.lists(st.sampled_from(pool), unique=True, max_size=r).map(tuple)
    replicas = tuple(draw(row) for _ in range(p))
    pending = draw(st.dictionaries(st.integers(0, p - 1), row, max_size=p))
    return MapRecord(draw(st.integers(0, 10**9)), p, r, replicas, pending)


@settings(max_examples=200, deadline=None)
@given(records())
def test_round_trip(record: MapRecord) -> None:
    raw = encode_map(record)
    assert json.loads(raw)["format"] == MAP_FORMAT
    assert decode_map(raw) == record
    assert decode_map(raw) == record  # second decode: from the row cache
    assert map_version_hint(raw) == record.version


def test_rows_are_readable_index_strings() -> None:
    record = MapRecord(7, 3, 3, (("a", "b"), ("b", "c"), ("c", "a")), {0: ("a", "b", "d")})
    obj = json.loads(encode_map(record))
    assert obj["nodes"] == ["a", "b", "c", "d"]
    assert obj["rows"] == ["01>013", "12", "20"]
    table = json.loads(encode_map(MapRecord(1, 11, 1, tuple((n,) for n in NODES[:11]))))
    # 11 nodes: two digits per index (the table is sorted: n0, n1, n10, n2, ...)
    assert table["rows"][0] == "00" and table["rows"][10] == "02"


def test_format_1_still_decodes() -> None:
    old = {
        "format": 1,
        "version": 3,
        "partitions": 2,
        "replica_factor": 2,
        "nodes": ["a", "b", "c"],
        "replicas": [[0, 1], [1, 2]],
        "pending": {"1": [1, 0]},
    }
    record = decode_map(json.dumps(old).encode())
    assert record == MapRecord(3, 2, 2, (("a", "b"), ("b", "c")), {1: ("b", "a")})


BASE = {"format": 2, "version": 1, "partitions": 2, "replica_factor": 2, "nodes": ["a", "b"]}


@pytest.mark.parametrize(
    "rows",
    [
        None,
        ["01"],  # too few rows
        ["01", "01", "01"],  # too many
        ["01", 1],  # not a string
        ["01", [0, 1]],  # unhashable
        ["01", "00"],  # a node twice
        ["01", "012"],  # longer than R
        ["01", "2"],  # outside the table
        ["01", "0>1>0"],  # two arrows
        ["01", "0>11"],  # pending names a node twice
        ["01", " 1"],  # not an index
        ["01", "\u00b9"],  # a digit str.isdigit accepts and the table does not
    ],
)
def test_bad_rows_are_refused(rows: object) -> None:
    with pytest.raises(RecordError):
        decode_map(json.dumps({**BASE, "rows": rows}).encode())


@pytest.mark.parametrize(
    "patch",
    [
        {"nodes": ["a", "a"]},
        {"nodes": ["a", "-b"]},
        {"nodes": "ab"},
        {"format": 3},
        {"format": 2.0},
        {"partitions": 0},
        {"version": -1},
    ],
)
def test_bad_headers_are_refused(patch: dict[str, object]) -> None:
    with pytest.raises(RecordError):
        decode_map(json.dumps({**BASE, "rows": ["01", "10"], **patch}).encode())


def test_two_digit_indices_are_fixed_width() -> None:
    obj = {**BASE, "partitions": 1, "nodes": NODES[:11], "rows": ["0010"]}
    assert decode_map(json.dumps(obj).encode()).replicas == (("n0", "n10"),)
    for bad in (["010"], ["0011"], ["0a10"]):
        with pytest.raises(RecordError):
            decode_map(json.dumps({**obj, "rows": bad}).encode())


def test_the_row_cache_never_mixes_tables() -> None:
    a = MapRecord(1, 2, 2, (("a", "b"), ("b", "a")))
    b = MapRecord(2, 2, 2, (("b", "c"), ("c", "b")))
    for record in (a, b, a, b):
        assert decode_map(encode_map(record)) == record
    # Same strings, different tables: "01" is a,b in one and b,c in the other.
    assert json.loads(encode_map(a))["rows"] == json.loads(encode_map(b))["rows"]


@given(st.binary(max_size=300))
def test_decoder_never_raises_anything_but_record_error(data: bytes) -> None:
    with contextlib.suppress(RecordError):
        decode_map(data)
    map_version_hint(data)


@given(st.lists(st.sampled_from(["01", "10", "0>01", "1>10", ">", "", "0", "x", 1, None])))
def test_decoder_is_strict_about_rows(rows: list[object]) -> None:
    raw = json.dumps({**BASE, "partitions": max(len(rows), 1), "rows": rows}).encode()
    with contextlib.suppress(RecordError):
        record = decode_map(raw)
        assert len(record.replicas) == len(rows)
        assert all(isinstance(r, str) for r in rows)


def test_size_at_65536_partitions_fits_etcd() -> None:
    """P = 65536, R = 3, 64 nodes: with no move and with every partition moving."""
    nodes = [f"node-{i:02d}" for i in range(64)]
    settled = plan(None, nodes, (), (), 65536, 3).record
    assert len(encode_map(settled)) < 650_000
    everything = MapRecord(
        2,
        65536,
        3,
        settled.replicas,
        {pt: tuple(reversed(row)) for pt, row in enumerate(settled.replicas)},
    )
    size = len(encode_map(everything))
    assert size < max_map_bytes(65536, 3) <= MAP_REQUEST_LIMIT
    assert decode_map(encode_map(everything)) == everything


def test_config_refuses_maps_that_cannot_fit() -> None:
    clusterkit.Config(node_id="n", partitions=65536, replica_factor=3, metrics_port=None)
    with pytest.raises(clusterkit.ConfigError, match="request limit"):
        clusterkit.Config(node_id="n", partitions=65536, replica_factor=4, metrics_port=None)
    with pytest.raises(clusterkit.ConfigError, match="partitions"):
        clusterkit.Config(node_id="n", partitions=1 << 20, replica_factor=1, metrics_port=None)


def test_node_ids_are_computed_once() -> None:
    record = MapRecord(1, 2, 2, (("a", "b"), ("b", "a")), {0: ("a", "c")})
    assert record.node_ids() == {"a", "b", "c"}
    assert record.node_ids() is record.node_ids()


def test_deep_nesting_is_a_record_error() -> None:
    """json.loads raises RecursionError on deep nesting: it must not escape the decoders
    (the watcher only expects RecordError from them)."""
    for value in (b"[" * 100_000, b'{"a":' * 100_000):
        with pytest.raises(RecordError):
            decode_map(value)
        with pytest.raises(RecordError):
            decode_node(value, "n1")
        assert map_version_hint(value) is None


@pytest.mark.parametrize("nodes", [8, 64])
def test_the_column_wise_parse_of_many_rows_is_as_strict_as_the_row_wise_one(
    nodes: int,
) -> None:
    """Maps with many distinct full rows take the bulk path (one and two digit indices)."""
    ids = [f"n{i:02d}" for i in range(nodes)]
    record = plan(None, ids, (), (), 512, 3).record
    raw = json.loads(encode_map(record))
    assert len(set(raw["rows"])) >= 64
    assert decode_map(json.dumps(raw).encode()) == record
    width = len(raw["rows"][0]) // 3
    bad_rows = [
        "9" * width * 3,  # an index outside the table
        raw["rows"][1][:width] * 3,  # a node three times
        "x" * width * 3,  # not digits
    ]
    for bad in bad_rows:
        rows = [*raw["rows"][:-1], bad]
        with pytest.raises(RecordError):
            decode_map(json.dumps({**raw, "rows": rows}).encode())
    # and a good map of the same table still decodes afterwards (nothing bad was cached)
    assert decode_map(json.dumps(raw).encode()) == record
