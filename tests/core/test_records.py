"""Codecs, key layout and views: pure, no I/O."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterkit._core.keys import KeyLayout, ParsedKey, valid_node_id
from clusterkit._core.records import (
    MapRecord,
    Node,
    RecordError,
    decode_map,
    decode_node,
    encode_map,
    encode_node,
)
from clusterkit._core.view import ViewState

LAYOUT = KeyLayout("/ck")


def test_node_round_trip_and_equality_by_value() -> None:
    node = Node("n1", "10.1.2.3", {"http": "h:1"}, {"zone": "a"}, "draining", 12.5)
    assert decode_node(encode_node(node), "n1") == node
    assert hash(node) == hash("n1") and node.http_addr() == "http://h:1" and node.grpc_addr() == ""
    assert node.peer_addr() == "h:1"  # a record of an earlier version: "http" was the peer endpoint


def test_a_node_advertises_the_applications_ports_and_its_peer_endpoint_apart() -> None:
    node = Node("n1", "10.0.0.1", {"peer": "10.0.0.1:40000", "http": "10.0.0.1:8080"})
    assert node.peer_addr() == "10.0.0.1:40000"
    assert node.http_addr() == "http://10.0.0.1:8080"  # the Go README's HTTPAddr()
    assert Node("n2", "h", {"peer": "h:1"}).http_addr() == ""  # http_port=0: none


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"id": "n1"}',
        b'{"id": "other", "addr": "a"}',
        b'{"id": "n1", "addr": "a", "state": "zombie"}',
        b'{"id": "n1", "addr": "a", "endpoints": {"http": 1}}',
        b'{"id": "n1", "addr": "a", "started": "yesterday"}',
        b'{"id": "-bad", "addr": "a"}',
    ],
)
def test_bad_node_records_are_refused(value: bytes) -> None:
    with pytest.raises(RecordError):
        decode_node(value, "n1")


def test_map_round_trip_uses_a_node_table() -> None:
    record = MapRecord(7, 4, 2, (("a", "b"), ("b", "c"), ("c", "a"), ("a", "c")), {1: ("d",)})
    raw = encode_map(record)
    assert json.loads(raw)["nodes"] == ["a", "b", "c", "d"]
    assert decode_map(raw) == record
    assert record.node_ids() == {"a", "b", "c", "d"}


def test_big_map_fits_etcd_request_limit() -> None:
    ids = [f"node-{i:04d}" for i in range(1000)]
    rows = tuple(tuple(ids[(p + k * 333) % 1000] for k in range(3)) for p in range(65536))
    assert len(encode_map(MapRecord(1, 65536, 3, rows))) < 1_500_000


@pytest.mark.parametrize(
    "obj",
    [
        {"format": 2},
        {"format": 1, "version": 1, "partitions": 2, "replica_factor": 1, "nodes": ["a"]},
        {
            "format": 1,
            "version": 1,
            "partitions": 1,
            "replica_factor": 1,
            "nodes": ["a"],
            "replicas": [[1]],
        },
        {
            "format": 1,
            "version": 1,
            "partitions": 1,
            "replica_factor": 1,
            "nodes": ["a"],
            "replicas": [[0, 0]],
        },
        {
            "format": 1,
            "version": 1,
            "partitions": 1,
            "replica_factor": 1,
            "nodes": ["a", "b"],
            "replicas": [[0, 1]],
        },
        {
            "format": 1,
            "version": -1,
            "partitions": 1,
            "replica_factor": 1,
            "nodes": [],
            "replicas": [[]],
        },
        {
            "format": 1,
            "version": 1,
            "partitions": 1,
            "replica_factor": 1,
            "nodes": ["a"],
            "replicas": [[0]],
            "pending": {"5": [0]},
        },
        {
            "format": 1,
            "version": True,
            "partitions": 1,
            "replica_factor": 1,
            "nodes": [],
            "replicas": [[]],
        },
    ],
)
def test_bad_maps_are_refused(obj: object) -> None:
    with pytest.raises(RecordError):
        decode_map(json.dumps(obj).encode())


@given(st.binary(max_size=200))
def test_decoders_never_raise_anything_but_record_error(data: bytes) -> None:
    for decode in (decode_map, lambda v: decode_node(v, "n1")):
        with contextlib.suppress(RecordError):
            decode(data)


def test_key_layout_parses_what_it_builds() -> None:
    assert LAYOUT.parse(LAYOUT.node("n-1")) == ParsedKey("node", node_id="n-1")
    assert LAYOUT.parse(LAYOUT.map) == ParsedKey("map")
    assert LAYOUT.parse(LAYOUT.coordinator) == ParsedKey("coordinator")
    assert LAYOUT.parse(LAYOUT.leader(17)) == ParsedKey("leader", partition=17)
    assert LAYOUT.parse(LAYOUT.ready(3, "n2")) == ParsedKey("ready", "n2", 3)
    foreign_keys = (
        b"/ck/other",
        b"/ck/nodes/",
        b"/ck/leaders/x",
        "/ck/leaders/\u00b2".encode(),  # '²'.isdigit() is True, int('²') fails
        "/ck/ready/\u00b2/n1".encode(),
        b"/ck/nodes/a\n",
        b"/ckx/map",
        b"/ck/\xff",
    )
    for foreign in foreign_keys:
        assert LAYOUT.parse(foreign) is None
    assert KeyLayout("/ck/").root == b"/ck/"
    assert valid_node_id("a.b_c:d-1") and not valid_node_id("") and not valid_node_id("a/b")


def test_view_state_applies_changes_and_ignores_garbage() -> None:
    state = ViewState(LAYOUT)
    assert state.apply(LAYOUT.node("a"), encode_node(Node("a", "h")), lease=1) is None
    assert state.apply(LAYOUT.node("b"), encode_node(Node("b", "h")), lease=2) is None
    # A well-formed node key without a lease (a hand-written ghost) is not a member.
    assert state.apply(LAYOUT.node("ghost"), encode_node(Node("ghost", "h"))) is not None
    assert "ghost" not in state.snapshot(4).nodes
    record = MapRecord(1, 2, 2, (("a", "b"), ("b", "a")))
    assert state.apply(LAYOUT.map, encode_map(record), mod_revision=5) is None
    v1 = state.snapshot(5)
    assert v1.converged(2) and [n.id for n in v1.replica_nodes[0]] == ["a", "b"]
    # Garbage is reported, and the key counts as absent.
    assert state.apply(LAYOUT.node("c"), b"garbage") is not None
    assert state.apply(b"/ck/unknown", b"x") is not None
    assert state.apply(LAYOUT.coordinator, b"a", create_revision=9, lease=4) is None
    # A node that leaves stays visible through the map as 'departed' until the map moves on.
    assert state.apply(LAYOUT.node("b"), None) is None
    v2 = state.snapshot(6)
    assert set(v2.nodes) == {"a"} and not v2.converged(2)
    assert v2.replica_nodes[0][1].id == "b" and v2.coordinator is not None
    assert v2.coordinator.create_revision == 9
    assert v1.nodes.keys() == {"a", "b"}  # snapshots are immutable
    # A garbage map keeps its revision so the coordinator can overwrite it, and the last
    # good map stays (routing and roles never fall back to "no map").
    assert state.apply(LAYOUT.map, b"{", mod_revision=8) is not None
    v3 = state.snapshot(8)
    assert v3.map == record and v3.map_revision == 8 and v3.map_problem is not None
    assert not v3.converged(2)
    # So does a deleted map (revision 0: the key is absent) and an older one.
    assert state.apply(LAYOUT.map, None) is not None
    v4 = state.snapshot(9)
    assert v4.map == record and v4.map_revision == 0 and v4.map_problem is not None
    older = MapRecord(0, 2, 2, (("b", "a"), ("a", "b")))
    assert state.apply(LAYOUT.map, encode_map(older), mod_revision=10) is not None
    assert state.snapshot(10).map == record
    newer = MapRecord(2, 2, 2, (("a", "b"), ("a", "b")))
    assert state.apply(LAYOUT.map, encode_map(newer), mod_revision=11) is None
    v5 = state.snapshot(11)
    assert v5.map == newer and v5.map_problem is None and v5.map_revision == 11


def test_view_state_refuses_a_map_of_another_shape() -> None:
    state = ViewState(LAYOUT, shape=(2, 2))
    good = MapRecord(1, 2, 2, (("a", "b"), ("b", "a")))
    assert state.apply(LAYOUT.map, encode_map(good), mod_revision=3) is None
    other = MapRecord(5, 3, 2, (("a", "b"), ("b", "a"), ("a", "b")))
    assert state.apply(LAYOUT.map, encode_map(other), mod_revision=4) is not None
    view = state.snapshot(4)
    assert view.map == good and view.map_revision == 4 and "shape" in (view.map_problem or "")


def test_view_state_reports_what_changed() -> None:
    state = ViewState(LAYOUT)
    state.snapshot(1)
    assert state.take_changes().everything  # the first load: everything is new
    state.apply(LAYOUT.leader(3), b"a", create_revision=4)
    state.apply(LAYOUT.ready(5, "b"), b"1")
    state.apply(LAYOUT.node("c"), encode_node(Node("c", "h")))
    assert not state.take_changes()  # nothing published yet: nothing to act on
    state.snapshot(4)
    changes = state.take_changes()
    assert changes.partitions == {3, 5} and changes.nodes == {"c"} and not changes.map
    assert not state.take_changes()
    state.apply(LAYOUT.map, encode_map(MapRecord(1, 2, 2, (("a", "b"), ("b", "a")))))
    state.snapshot(5)
    state.apply(LAYOUT.leader(1), b"b", create_revision=6)
    state.snapshot(6)  # two views published before the reader looked: the union
    changes = state.take_changes()
    assert changes.map and changes.partitions == {1}
