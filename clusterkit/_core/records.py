"""Codecs for the values clusterkit stores in etcd: node records and the partition map.

Values are JSON so operators can read them with ``etcdctl get``. Decoding is strict: anything
that is not exactly what clusterkit writes raises :class:`RecordError`, which the watcher
logs, counts and ignores — garbage under the prefix never crashes a node.

The partition map (format 2) stores a node table and one short string per partition: the
committed replicas as fixed-width decimal indices into the table, then, while a move is in
flight, ``>`` and the row it moves to. With nodes ``["a", "b", "c", "d"]``, ``"01>013"``
reads "committed on a and b, moving to a, b and d"; with 11 to 100 nodes every index takes
two digits (``"0003>000304"``). Cost is what this layout is for:

- size: 3 + (R + R') * digits bytes per partition, so even P = 65536, R = 3 with every
  partition moving and up to 1,000 nodes stays under etcd's 1.5 MiB request limit
  (``max_map_bytes`` is the bound, checked by ``Config``);
- decoding: the JSON parser is C; each *distinct* row string is parsed and validated once
  (a cluster has far fewer distinct rows than partitions), and parsed rows are kept per
  node table between decodes, so the maps of one join cost one dictionary lookup per
  partition. Decoding stays strict: anything malformed raises :class:`RecordError`.

Format 1 (a list of index lists and a ``pending`` object) is still decoded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import compress
from typing import Any

from .keys import is_number, valid_node_id

MAP_FORMAT = 2
MAP_FORMATS = (1, 2)  # formats decode_map reads
NODE_STATES = ("active", "draining")


class RecordError(ValueError):
    """A value under the cluster prefix is not a valid clusterkit record."""


@dataclass(frozen=True, eq=True)
class Node:
    """A member of the cluster, as registered in etcd.

    Attributes:
        id: the node id (unique among live nodes).
        addr: the address other nodes and clients reach it at.
        endpoints: named ``host:port`` endpoints: ``"peer"`` (clusterkit's), ``"http"`` and
            ``"grpc"`` (the application's services).
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
        """``http://host:port`` of the node's HTTP service (the application's), or ``""``."""
        addr = self.endpoints.get("http", "")
        return f"http://{addr}" if addr else ""

    def grpc_addr(self) -> str:
        """``host:port`` of the node's gRPC service, or ``""``."""
        return self.endpoints.get("grpc", "")

    def peer_addr(self) -> str:
        """``host:port`` of clusterkit's peer endpoint (``ck.peers``), or ``""``.

        Records of earlier versions have no ``"peer"`` endpoint: their ``"http"`` one was it.
        """
        return self.endpoints.get("peer") or self.endpoints.get("http", "")

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
    except RecursionError:
        raise RecordError(f"{what} is nested too deeply") from None


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
        """Every node that holds at least one replica (computed once per record)."""
        return self._node_ids

    @cached_property
    def _node_ids(self) -> frozenset[str]:
        return frozenset().union(*self.replicas, *self.pending.values())

    def as_assignment(self) -> dict[int, tuple[str, ...]]:
        return dict(enumerate(self.replicas))


def _width(table_size: int) -> int:
    """Digits per node-table index: 1 up to 10 nodes, 2 up to 100, and so on."""
    return len(str(max(table_size - 1, 0)))


def max_map_bytes(partitions: int, replica_factor: int, nodes: int = 1000) -> int:
    """An upper bound of the encoded size of a map, every partition moving.

    Args:
        partitions: P.
        replica_factor: R.
        nodes: how many distinct nodes the map may name (ids of up to 40 characters).

    Returns:
        The bound in bytes: 4 + 2 * R * digits per partition, plus the node table.
    """
    digits = _width(nodes)
    return 256 + nodes * 43 + partitions * (4 + 2 * replica_factor * digits)


class _RowCodes(dict[tuple[str, ...], str]):
    """Row -> its index string; each distinct row is encoded once."""

    def __init__(self, code: Mapping[str, str]) -> None:
        super().__init__()
        self.code = code

    def __missing__(self, row: tuple[str, ...]) -> str:
        text = self[row] = "".join(map(self.code.__getitem__, row))
        return text


def encode_map(record: MapRecord) -> bytes:
    """The JSON value of ``P/map`` (format 2, see the module docstring)."""
    table = sorted(record.node_ids())
    width = _width(len(table))
    codes = _RowCodes({nid: f"{i:0{width}d}" for i, nid in enumerate(table)})
    rows = list(map(codes.__getitem__, record.replicas))
    for pt, row in record.pending.items():
        rows[pt] = f"{rows[pt]}>{codes[row]}"
    return json.dumps(
        {
            "format": MAP_FORMAT,
            "version": record.version,
            "partitions": record.partitions,
            "replica_factor": record.replica_factor,
            "nodes": table,
            "rows": rows,
        },
        separators=(",", ":"),
    ).encode()


class _Rows:
    """Parsed row strings of one node table: committed rows, and pending rows of moves."""

    __slots__ = ("_chunks", "committed", "lookup", "moving", "r", "table", "width")

    def __init__(self, table: tuple[str, ...], r: int) -> None:
        self.table, self.r = table, r
        self.width = _width(len(table))
        self.lookup = {f"{i:0{self.width}d}": nid for i, nid in enumerate(table)}
        self.committed: dict[str, tuple[str, ...]] = {}
        self.moving: dict[str, tuple[str, ...]] = {}
        self._chunks = re.compile("." * self.width, re.DOTALL).findall

    def add(self, text: object) -> None:
        """Parse and validate one row string (raises RecordError)."""
        if type(text) is not str:
            raise RecordError("partition map rows must be strings")
        committed, arrow, target = text.partition(">")
        row = self._row(committed, text)
        if arrow:
            self.moving[text] = self._row(target, text)
        self.committed[text] = row

    def add_all(self, texts: Collection[object]) -> None:
        """Parse many row strings (raises RecordError for the first bad one).

        Full rows without a move, the bulk of a map, are parsed column by column with C
        loops (slices of their concatenation); the others, and every row of a batch with a
        bad one, one by one.
        """
        size = self.r * self.width
        plain = [t for t in texts if type(t) is str and len(t) == size and ">" not in t]
        if len(plain) >= _BULK_ROWS:
            rows = self._bulk(plain)
            if rows is not None:
                self.committed.update(zip(plain, rows, strict=True))
        for text in texts:
            if text not in self.committed:
                self.add(text)

    def _bulk(self, plain: list[str]) -> list[tuple[str, ...]] | None:
        r, width = self.r, self.width
        joined, stride, get = "".join(plain), r * width, self.lookup.__getitem__
        columns = []
        for j in range(r):
            if width == 1:
                keys: Iterable[str] = joined[j::stride]
            else:
                digits = (joined[j * width + q :: stride] for q in range(width))
                keys = map("".join, zip(*digits, strict=True))
            columns.append(map(get, keys))
        try:
            rows = list(zip(*columns, strict=True))
        except KeyError:
            return None  # an index outside the table: the row-by-row pass names it
        if r > 1 and min(map(len, map(set, rows))) != r:
            return None  # a node twice in some row: likewise
        return rows

    def _row(self, text: str, whole: str) -> tuple[str, ...]:
        width, n = self.width, len(text)
        if n % width or n > self.r * width:
            raise RecordError(f"row {whole!r}: at most {self.r} indices of {width} digits")
        try:
            row = tuple(map(self.lookup.__getitem__, text if width == 1 else self._chunks(text)))
        except KeyError:
            raise RecordError(f"row {whole!r} has an index outside the node table") from None
        if len(set(row)) != len(row):
            raise RecordError(f"row {whole!r} names a node twice")
        return row


# The rows of the last node table decoded. Rows are immutable tuples of the table's own
# strings, so maps that share rows share them (and compare them by identity first).
_ROWS_CACHE = _Rows((), 1)
_BULK_ROWS = 64  # new rows from which the column-wise parse pays


def _decode_rows(
    obj: dict[str, Any], p: int, r: int
) -> tuple[tuple[tuple[str, ...], ...], dict[int, tuple[str, ...]]]:
    global _ROWS_CACHE
    table = obj.get("nodes")
    if (
        not isinstance(table, list)
        or not all(isinstance(n, str) and valid_node_id(n) for n in table)
        or len(set(table)) != len(table)
    ):
        raise RecordError("partition map nodes must be a list of distinct node ids")
    rows = obj.get("rows")
    if not isinstance(rows, list) or len(rows) != p:
        raise RecordError(f"partition map must have {p} rows")
    try:
        distinct = set(rows)
    except TypeError:
        raise RecordError("partition map rows must be strings") from None
    cache = _ROWS_CACHE
    key = tuple(table)
    if cache.table != key or cache.r != r or len(cache.committed) > 4 * p + 1024:
        cache = _ROWS_CACHE = _Rows(key, r)
    committed, moving = cache.committed, cache.moving
    cache.add_all(distinct.difference(committed))  # only rows never seen with this table
    replicas = tuple(map(committed.__getitem__, rows))
    pending: dict[int, tuple[str, ...]] = {}
    if moving:
        for pt in compress(range(p), map(moving.__contains__, rows)):
            pending[pt] = moving[rows[pt]]
    return replicas, pending


def _row_v1(obj: Any, table: Sequence[str], what: str) -> tuple[str, ...]:
    if not isinstance(obj, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(table) for i in obj
    ):
        raise RecordError(f"{what} must be a list of node-table indices")
    if len(set(obj)) != len(obj):
        raise RecordError(f"{what} names a node twice")
    return tuple(table[i] for i in obj)


def _decode_rows_v1(
    obj: dict[str, Any], p: int, r: int
) -> tuple[tuple[tuple[str, ...], ...], dict[int, tuple[str, ...]]]:
    table = obj.get("nodes")
    if not isinstance(table, list) or not all(
        isinstance(n, str) and valid_node_id(n) for n in table
    ):
        raise RecordError("partition map nodes must be a list of node ids")
    rows = obj.get("replicas")
    if not isinstance(rows, list) or len(rows) != p:
        raise RecordError(f"partition map must have {p} replica rows")
    replicas = tuple(_row_v1(row, table, f"replicas[{i}]") for i, row in enumerate(rows))
    if any(len(row) > r for row in replicas):
        raise RecordError("a partition has more replicas than replica_factor")
    pending_obj = obj.get("pending", {})
    if not isinstance(pending_obj, dict):
        raise RecordError("partition map pending must be an object")
    pending: dict[int, tuple[str, ...]] = {}
    for key, row in pending_obj.items():
        if not is_number(key) or int(key) >= p:
            raise RecordError(f"partition map pending has a bad partition {key!r}")
        pending[int(key)] = _row_v1(row, table, f"pending[{key}]")
        if len(pending[int(key)]) > r:
            raise RecordError("a pending row has more replicas than replica_factor")
    return replicas, pending


def decode_map(value: bytes) -> MapRecord:
    """Parse and validate ``P/map`` (format 2, or format 1 as older versions wrote it).

    Raises:
        RecordError: the value is not exactly a map clusterkit writes.
    """
    obj = _load(value, "partition map")
    if not isinstance(obj, dict) or obj.get("format") not in MAP_FORMATS:
        raise RecordError(f"partition map must be an object with a format in {MAP_FORMATS}")
    fmt = obj["format"]
    version, p, r = obj.get("version"), obj.get("partitions"), obj.get("replica_factor")
    for name, v in (("version", version), ("partitions", p), ("replica_factor", r)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "version" else 1):
            raise RecordError(f"partition map {name} must be a positive integer")
    assert isinstance(p, int) and isinstance(r, int) and isinstance(version, int)
    if type(fmt) is not int:
        raise RecordError("partition map format must be an integer")
    decode_rows = _decode_rows if fmt == 2 else _decode_rows_v1
    replicas, pending = decode_rows(obj, p, r)
    return MapRecord(version, p, r, replicas, pending)


def map_version_hint(value: bytes) -> int | None:
    """The ``version`` of a stored map that may not decode (for a repair above it), or None."""
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    version = obj.get("version") if isinstance(obj, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version >= 0:
        return version
    return None


# -- the cluster's identity (``P/cluster``) --------------------------------------------------

IDENTITY_FORMAT = 1
HASH_FUNCTION = "mmh3-x86_32-seed0"
"""How keys pick partitions: MurmurHash3 x86 32-bit, seed 0, unsigned, mod P."""


@dataclass(frozen=True)
class IdentityRecord:
    """What every node of a cluster must agree on, stored once at ``P/cluster``.

    Attributes:
        partitions: P.
        replica_factor: R.
        hash_function: how keys pick partitions (:data:`HASH_FUNCTION`).
        map_format: the partition map format the cluster was created with.
    """

    partitions: int
    replica_factor: int
    hash_function: str = HASH_FUNCTION
    map_format: int = MAP_FORMAT


def encode_identity(record: IdentityRecord) -> bytes:
    """The JSON value of ``P/cluster``."""
    return json.dumps(
        {
            "format": IDENTITY_FORMAT,
            "partitions": record.partitions,
            "replica_factor": record.replica_factor,
            "hash": record.hash_function,
            "map_format": record.map_format,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def decode_identity(value: bytes) -> IdentityRecord:
    """Parse ``P/cluster``.

    Raises:
        RecordError: the value is not exactly an identity record clusterkit writes.
    """
    obj = _load(value, "cluster identity")
    if not isinstance(obj, dict) or obj.get("format") != IDENTITY_FORMAT:
        raise RecordError(f"cluster identity must be an object with format {IDENTITY_FORMAT}")
    fields = ("partitions", "replica_factor", "map_format")
    for name in fields:
        v = obj.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RecordError(f"cluster identity {name} must be a positive integer")
    hash_function = obj.get("hash")
    if not isinstance(hash_function, str) or not hash_function:
        raise RecordError("cluster identity hash must be a non-empty string")
    return IdentityRecord(
        obj["partitions"], obj["replica_factor"], hash_function, obj["map_format"]
    )
