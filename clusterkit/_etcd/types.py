"""Typed, immutable values for the etcd client API (no protobuf objects leak out)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

Key = str | bytes
CompareOp = Literal["=", "!=", "<", ">"]


def to_bytes(key: Key) -> bytes:
    """Encode a key or value: ``str`` as UTF-8, ``bytes`` unchanged."""
    return key.encode() if isinstance(key, str) else bytes(key)


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\x00"  # every key >= prefix
    return stripped[:-1] + bytes([stripped[-1] + 1])


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as stored by etcd, with its revisions."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_pb(cls, kv: Any) -> KeyValue:
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True, slots=True)
class RangeResult:
    """The answer to a range read: the keys, the store revision, the total count."""

    kvs: tuple[KeyValue, ...]
    revision: int
    count: int
    more: bool = False


@dataclass(frozen=True, slots=True)
class PutResult:
    """The answer to a put: the revision it created and, if asked for, the previous value."""

    revision: int
    prev_kv: KeyValue | None = None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """The answer to a delete: how many keys went and, if asked for, their last values."""

    revision: int
    deleted: int
    prev_kvs: tuple[KeyValue, ...] = ()


class _Target(enum.IntEnum):
    # Values are etcdserverpb.Compare.CompareTarget.
    VERSION = 0
    CREATE = 1
    MOD = 2
    VALUE = 3
    LEASE = 4


COMPARE_OPS: dict[str, int] = {"=": 0, ">": 1, "<": 2, "!=": 3}  # Compare.CompareResult


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction; build it with the classmethods.

    Example: ``Compare.create_revision("/k", "=", 0)`` holds while ``/k`` does not exist.
    """

    key: bytes
    target: int
    op: str
    operand: int | bytes
    range_end: bytes = b""

    def __post_init__(self) -> None:
        if self.op not in COMPARE_OPS:
            raise ValueError(f"compare op must be one of {sorted(COMPARE_OPS)}, got {self.op!r}")

    @classmethod
    def value(cls, key: Key, op: CompareOp, value: Key) -> Compare:
        """Compare the key's value."""
        return cls(to_bytes(key), _Target.VALUE, op, to_bytes(value))

    @classmethod
    def version(cls, key: Key, op: CompareOp, version: int) -> Compare:
        """Compare the key's version (0 when the key does not exist)."""
        return cls(to_bytes(key), _Target.VERSION, op, version)

    @classmethod
    def create_revision(cls, key: Key, op: CompareOp, revision: int) -> Compare:
        """Compare the revision that created the key (0 when the key does not exist)."""
        return cls(to_bytes(key), _Target.CREATE, op, revision)

    @classmethod
    def mod_revision(cls, key: Key, op: CompareOp, revision: int) -> Compare:
        """Compare the revision of the key's last modification (0 when it does not exist)."""
        return cls(to_bytes(key), _Target.MOD, op, revision)

    @classmethod
    def lease(cls, key: Key, op: CompareOp, lease_id: int) -> Compare:
        """Compare the lease the key is attached to (0 for none)."""
        return cls(to_bytes(key), _Target.LEASE, op, lease_id)


@dataclass(frozen=True, slots=True)
class GetOp:
    """A range read inside a transaction."""

    key: bytes
    range_end: bytes = b""
    limit: int = 0
    keys_only: bool = False
    count_only: bool = False


@dataclass(frozen=True, slots=True)
class PutOp:
    """A put inside a transaction."""

    key: bytes
    value: bytes
    lease: int = 0
    prev_kv: bool = False
    ignore_lease: bool = False


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """A delete inside a transaction."""

    key: bytes
    range_end: bytes = b""
    prev_kv: bool = False


TxnOp = GetOp | PutOp | DeleteOp


class Op:
    """Builders for transaction operations."""

    @staticmethod
    def get(key: Key, *, prefix: bool = False, limit: int = 0) -> GetOp:
        """Read ``key`` (or every key under it with ``prefix=True``)."""
        k = to_bytes(key)
        return GetOp(k, prefix_end(k) if prefix else b"", limit)

    @staticmethod
    def put(
        key: Key, value: Key, *, lease: int = 0, prev_kv: bool = False, ignore_lease: bool = False
    ) -> PutOp:
        """Write ``value`` to ``key``, optionally attached to a lease."""
        return PutOp(to_bytes(key), to_bytes(value), lease, prev_kv, ignore_lease)

    @staticmethod
    def delete(key: Key, *, prefix: bool = False, prev_kv: bool = False) -> DeleteOp:
        """Delete ``key`` (or every key under it with ``prefix=True``)."""
        k = to_bytes(key)
        return DeleteOp(k, prefix_end(k) if prefix else b"", prev_kv)


@dataclass(frozen=True, slots=True)
class TxnResult:
    """The answer to a transaction: which branch ran and what each of its ops returned."""

    succeeded: bool
    revision: int
    responses: tuple[RangeResult | PutResult | DeleteResult, ...] = ()


class EventType(enum.Enum):
    """What happened to a key."""

    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    """One change seen by a watch. ``prev_kv`` is set when the watch asked for it."""

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Events of one watch response, in revision order.

    ``revision`` is the response header's: the store's revision when etcd sent it, which
    can be far past the last event while etcd is catching a watch up (it sends up to 1000
    revisions per response). To resume a watch, start after the last *event's*
    ``kv.mod_revision``. A batch with no events and ``progress=True`` is a progress
    notification: the watch has seen every change up to ``revision``.
    """

    revision: int
    events: tuple[Event, ...]
    progress: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease. ``ttl`` is what etcd granted, which may exceed what was asked."""

    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """A keepalive etcd acknowledged.

    ``sent_at`` is the ``trio.current_time()`` at which the request was sent, so the lease is
    certainly alive until ``sent_at + ttl``.
    """

    id: int
    ttl: int
    sent_at: float


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease's remaining and granted TTL and, if asked for, its keys."""

    id: int
    ttl: int
    granted_ttl: int
    keys: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Member:
    """One member of the etcd cluster."""

    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool = False


@dataclass(frozen=True, slots=True)
class Status:
    """A member's status, including the etcd server version."""

    version: str
    db_size: int
    leader: int
    member_id: int
    raft_index: int
    raft_term: int
    errors: tuple[str, ...] = field(default=())
