"""Codecs for the values clusterkit stores in etcd: node records and the partition map.

Values are JSON so operators can read them with ``etcdctl get``. Decoding is strict: anything
that is not exactly what clusterkit writes raises :class:`RecordError`, which the watcher
logs, counts and ignores — garbage under the prefix never crashes a node.

The partition map stores a node table and, per partition, indices into it, so a map for
P = 65536, R = 3 stays around 0.5 MB (etcd refuses requests over 1.5 MiB by default).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .keys import is_number, valid_node_id

MAP_FORMAT = 1
NODE_STATES = ("active", "draining")


class RecordError(ValueError):
    """A value under the cluster prefix is not a valid clusterkit record."""


@dataclass(frozen=True, eq=True)
class Node:
    """A member of the cluster, as registered in etcd.

    Attributes:
        id: the node id (unique among live nodes).
        addr: the address other nodes and clients reach it at.
        endpoints: named ``host:port`` endpoints (``"http"``, ``"grpc"``, ...).
        metadata: free-form string pairs from the node's config.
        state: ``"active"``, or ``"draining"`` while it leaves with ``drain=True``.
        started: Unix time at which the node registered.
    """

    id: str
    addr: str
    endpoints: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    state: str = "active"
    started: float = 0.0

    def __hash__(self) -> int:
        return hash(self.id)

    def http_addr(self) -> str:
        """``host:port`` of the node's HTTP/websocket endpoint (peer transport)."""
        return self.endpoints.get("http", "")

    def grpc_addr(self) -> str:
        """``host:port`` of the node's gRPC endpoint."""
        return self.endpoints.get("grpc", "")

    def __repr__(self) -> str:
        return f"Node({self.id!r}, {self.addr!r}, state={self.state!r})"


def encode_node(node: Node) -> bytes:
    """The JSON value of ``P/nodes/<id>``."""
    return json.dumps(
        {
            "id": node.id,
            "addr": node.addr,
            "endpoints": dict(node.endpoints),
            "metadata": dict(node.metadata),
            "state": node.state,
            "started": node.started,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def _load(value: bytes, what: str) -> Any:
    try:
        return json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{what} is not JSON: {exc}") from None


def _str_map(obj: Any, what: str) -> dict[str, str]:
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in obj.items()
    ):
        raise RecordError(f"{what} must be an object of strings")
    return dict(obj)


def decode_node(value: bytes, node_id: str | None = None) -> Node:
    """Parse a node record; ``node_id`` (from the key) must match the record's id."""
    obj = _load(value, "node record")
    if not isinstance(obj, dict):
        raise RecordError("node record must be a JSON object")
    nid, addr, state = obj.get("id"), obj.get("addr"), obj.get("state", "active")
    if not isinstance(nid, str) or not valid_node_id(nid):
        raise RecordError(f"node record has an invalid id: {nid!r}")
    if node_id is not None and nid != node_id:
        raise RecordError(f"node record id {nid!r} does not match its key ({node_id!r})")
    if not isinstance(addr, str):
        raise RecordError("node record addr must be a string")
    if state not in NODE_STATES:
        raise RecordError(f"node record state must be one of {NODE_STATES}")
    started = obj.get("started", 0.0)
    if not isinstance(started, int | float) or isinstance(started, bool):
        raise RecordError("node record started must be a number")
    return Node(
        nid,
        addr,
        _str_map(obj.get("endpoints", {}), "endpoints"),
        _str_map(obj.get("metadata", {}), "metadata"),
        state,
        float(started),
    )


@dataclass(frozen=True)
class MapRecord:
    """The partition map stored at ``P/map``.

    Attributes:
        version: increases by one with every map the coordinators write.
        partitions: P, fixed for the cluster's life.
        replica_factor: R, fixed for the cluster's life.
        replicas: per partition, the committed replica ids (preferred leader first): the
            nodes that hold the partition's data and serve it.
        pending: per partition with a move in flight, the row it moves to; its nodes that are
            not committed yet are *joining* (two-phase handoff, see ``handoff.py``).
    """

    version: int
    partitions: int
    replica_factor: int
    replicas: tuple[tuple[str, ...], ...]
    pending: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    def node_ids(self) -> frozenset[str]:
        """Every node that holds at least one replica."""
        ids: set[str] = set()
        for row in self.replicas:
            ids.update(row)
        for row in self.pending.values():
            ids.update(row)
        return frozenset(ids)

    def as_assignment(self) -> dict[int, tuple[str, ...]]:
        return dict(enumerate(self.replicas))


def encode_map(record: MapRecord) -> bytes:
    """The JSON value of ``P/map``: a node table plus per-partition indices into it."""
    table = sorted(record.node_ids())
    index = {nid: i for i, nid in enumerate(table)}
    return json.dumps(
        {
            "format": MAP_FORMAT,
            "version": record.version,
            "partitions": record.partitions,
            "replica_factor": record.replica_factor,
            "nodes": table,
            "replicas": [[index[n] for n in row] for row in record.replicas],
            "pending": {str(pt): [index[n] for n in row] for pt, row in record.pending.items()},
        },
        separators=(",", ":"),
    ).encode()


def _row(obj: Any, table: Sequence[str], what: str) -> tuple[str, ...]:
    if not isinstance(obj, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(table) for i in obj
    ):
        raise RecordError(f"{what} must be a list of node-table indices")
    if len(set(obj)) != len(obj):
        raise RecordError(f"{what} names a node twice")
    return tuple(table[i] for i in obj)


def decode_map(value: bytes) -> MapRecord:
    """Parse and validate ``P/map``."""
    obj = _load(value, "partition map")
    if not isinstance(obj, dict) or obj.get("format") != MAP_FORMAT:
        raise RecordError(f"partition map must be an object with format {MAP_FORMAT}")
    version, p, r = obj.get("version"), obj.get("partitions"), obj.get("replica_factor")
    for name, v in (("version", version), ("partitions", p), ("replica_factor", r)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "version" else 1):
            raise RecordError(f"partition map {name} must be a positive integer")
    assert isinstance(p, int) and isinstance(r, int) and isinstance(version, int)
    table = obj.get("nodes")
    if not isinstance(table, list) or not all(
        isinstance(n, str) and valid_node_id(n) for n in table
    ):
        raise RecordError("partition map nodes must be a list of node ids")
    rows = obj.get("replicas")
    if not isinstance(rows, list) or len(rows) != p:
        raise RecordError(f"partition map must have {p} replica rows")
    replicas = tuple(_row(row, table, f"replicas[{i}]") for i, row in enumerate(rows))
    if any(len(row) > r for row in replicas):
        raise RecordError("a partition has more replicas than replica_factor")
    pending_obj = obj.get("pending", {})
    if not isinstance(pending_obj, dict):
        raise RecordError("partition map pending must be an object")
    pending: dict[int, tuple[str, ...]] = {}
    for key, row in pending_obj.items():
        if not is_number(key) or int(key) >= p:
            raise RecordError(f"partition map pending has a bad partition {key!r}")
        pending[int(key)] = _row(row, table, f"pending[{key}]")
        if len(pending[int(key)]) > r:
            raise RecordError("a pending row has more replicas than replica_factor")
    return MapRecord(version, p, r, replicas, pending)
