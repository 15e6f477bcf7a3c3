"""etcd's multi-version key space, in memory: revisions, ranges, transactions, compaction.

Rules (each one measured against etcd 3.4.23 and 3.5.1 by ``tests/contract``):

- One store revision, 1 when empty. A write transaction that changes anything takes the next
  revision, however many keys it touches; a read-only one, or one whose deletes found nothing,
  takes none. Inside a transaction, ops see the changes of earlier ops, and each response
  carries the revision as it stood after that op (the old one until the first change).
- Per key: ``create_revision`` is the revision that created the key's current incarnation,
  ``mod_revision`` its last change, ``version`` the number of puts since it was created (1
  again after a delete and a re-put). A delete leaves a tombstone; its watch event carries the
  key and the deleting revision only.
- A range reads at a revision (0: the latest), answers with the *current* revision, counts
  every match, and sorts by key unless told otherwise (another target without an order sorts
  ascending; ties keep key order).
- Compacting at R keeps, per key, its state at R (unless deleted) and everything after R;
  reads below R fail; tombstones written at R itself are gone from the event log.

Nothing here knows about time, leases or clients: :class:`~.memory_store.MemoryEtcd` wraps it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from .._errors import InvalidRequest, LeaseNotFound, RevisionCompacted
from .._etcd.types import (
    Compare,
    DeleteOp,
    DeleteResult,
    Event,
    EventType,
    GetOp,
    KeyValue,
    PutOp,
    PutResult,
    RangeResult,
    TxnOp,
    TxnResult,
)

MAX_TXN_OPS = 128  # etcd's --max-txn-ops default
_VALUE_TARGET = 3  # etcdserverpb.Compare.VALUE; 0..4 are version, create, mod, value, lease

_SORT_KEYS: dict[str, Callable[[KeyValue], Any]] = {
    "key": lambda kv: kv.key,
    "version": lambda kv: kv.version,
    "create": lambda kv: kv.create_revision,
    "mod": lambda kv: kv.mod_revision,
    "value": lambda kv: kv.value,
}


def invalid(details: str, code: str = "INVALID_ARGUMENT") -> InvalidRequest:
    """The InvalidRequest the real client raises for etcd's error ``details``."""
    return InvalidRequest(f"etcdserver: {details}", code=code)


def empty_key() -> InvalidRequest:
    return invalid("key is not provided")


def future_revision() -> InvalidRequest:
    return invalid("mvcc: required revision is a future revision", "OUT_OF_RANGE")


def compacted() -> RevisionCompacted:
    return RevisionCompacted(
        "etcdserver: mvcc: required revision has been compacted", code="OUT_OF_RANGE"
    )


def lease_not_found() -> LeaseNotFound:
    return LeaseNotFound("etcdserver: requested lease not found", code="NOT_FOUND")


def in_range(key: bytes, start: bytes, end: bytes) -> bool:
    """Whether ``key`` is selected by etcd's ``(key, range_end)`` pair."""
    if not end:
        return key == start
    if end == b"\x00":
        return key >= start
    return start <= key < end


def _holds(c: Compare, kv: KeyValue) -> bool:
    if c.target == _VALUE_TARGET:
        if not isinstance(c.operand, bytes):
            raise TypeError(f"a value compare needs bytes, got {c.operand!r}")
        a, b = kv.value, c.operand
        diff = (a > b) - (a < b)
    else:
        if not isinstance(c.operand, int):
            raise TypeError(f"a revision, version or lease compare needs an int, got {c.operand!r}")
        x = (kv.version, kv.create_revision, kv.mod_revision, 0, kv.lease)[c.target]
        diff = (x > c.operand) - (x < c.operand)
    return {"=": diff == 0, "!=": diff != 0, "<": diff < 0, ">": diff > 0}[c.op]


def _check_ops(ops: Sequence[TxnOp]) -> None:
    """etcd's static checks of one branch: keys given, no key both written and deleted."""
    if len(ops) > MAX_TXN_OPS:
        raise invalid("too many operations in txn request")
    puts: set[bytes] = set()
    for op in ops:
        if not op.key:
            raise empty_key()
        if isinstance(op, PutOp):
            if op.ignore_lease and op.lease:
                raise invalid("lease is provided")
            if op.key in puts:
                raise invalid("duplicate key given in txn request")
            puts.add(op.key)
    for op in ops:
        if isinstance(op, DeleteOp) and any(in_range(k, op.key, op.range_end) for k in puts):
            raise invalid("duplicate key given in txn request")


class _Write:
    """The changes of one write transaction, applied to the history as they happen."""

    __slots__ = ("begin", "events")

    def __init__(self, begin: int) -> None:
        self.begin = begin
        self.events: list[Event] = []

    @property
    def rev(self) -> int:
        return self.begin + 1 if self.events else self.begin


class Mvcc:
    """The versioned key space. Single-threaded: every method runs to completion."""

    def __init__(self) -> None:
        self.revision = 1
        self.compact_revision = -1  # etcd's value before the first compaction
        self._keys: list[bytes] = []  # every key with history, sorted
        # Per key, its (revision, state) entries in revision order; None is a tombstone.
        self._history: dict[bytes, list[tuple[int, KeyValue | None]]] = {}
        self._log: list[Event] = []  # every event still in history, in revision order

    def live_keys(self) -> int:
        return sum(1 for h in self._history.values() if h[-1][1] is not None)

    def size(self) -> int:
        return sum(
            len(k) + sum(len(e[1].value) for e in h if e[1]) for k, h in self._history.items()
        )

    # -- reads ----------------------------------------------------------------------------

    def _at(self, key: bytes, rev: int) -> KeyValue | None:
        hist = self._history.get(key)
        if not hist:
            return None
        i = bisect.bisect_right(hist, rev, key=lambda e: e[0])
        return hist[i - 1][1] if i else None

    def _read(self, key: bytes, end: bytes, rev: int) -> list[KeyValue]:
        if not end:
            kv = self._at(key, rev)
            return [kv] if kv is not None else []
        lo = bisect.bisect_left(self._keys, key)
        hi = len(self._keys) if end == b"\x00" else bisect.bisect_left(self._keys, end)
        return [kv for k in self._keys[lo:hi] if (kv := self._at(k, rev)) is not None]

    def range(
        self,
        key: bytes,
        end: bytes,
        *,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        sort_order: str = "none",
        sort_target: str = "key",
    ) -> RangeResult:
        if not key:
            raise empty_key()
        if revision > self.revision:
            raise future_revision()
        rev = revision if revision > 0 else self.revision
        if rev < self.compact_revision:
            raise compacted()
        return self._range(
            key, end, rev, self.revision, limit, keys_only, count_only, sort_order, sort_target
        )

    def _range(
        self,
        key: bytes,
        end: bytes,
        rev: int,
        header: int,
        limit: int,
        keys_only: bool,
        count_only: bool,
        sort_order: str,
        sort_target: str,
    ) -> RangeResult:
        kvs = self._read(key, end, rev)
        count = len(kvs)
        if count_only:
            return RangeResult((), header, count, False)
        if sort_target != "key" and sort_order == "none":
            sort_order = "ascend"
        if sort_order != "none":
            kvs.sort(key=_SORT_KEYS[sort_target], reverse=sort_order == "descend")
        more = 0 < limit < count
        if more:
            kvs = kvs[:limit]
        if keys_only:
            kvs = [replace(kv, value=b"") for kv in kvs]
        return RangeResult(tuple(kvs), header, count, more)

    def holds(self, c: Compare) -> bool:
        """Whether a transaction condition holds now (etcd's rules for missing keys)."""
        kvs = self._read(c.key, c.range_end, self.revision)
        if not kvs:
            if c.target == _VALUE_TARGET:
                return False  # etcd: a value compare on a missing key always fails
            kvs = [KeyValue(c.key, b"", 0, 0, 0, 0)]
        return all(_holds(c, kv) for kv in kvs)

    def prev_kv(self, event: Event) -> KeyValue | None:
        """The key's state before ``event``, as etcd attaches it to watch events."""
        if event.type is EventType.PUT and event.kv.version == 1:
            return None
        rev = event.kv.mod_revision - 1
        return None if rev < self.compact_revision else self._at(event.kv.key, rev)

    def events_since(self, revision: int) -> list[Event]:
        i = bisect.bisect_left(self._log, revision, key=lambda e: e.kv.mod_revision)
        return self._log[i:]

    # -- writes ---------------------------------------------------------------------------

    def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp],
        lease_exists: Callable[[int], bool],
    ) -> tuple[TxnResult, list[Event]]:
        """Run a transaction; returns its result and the events of its revision."""
        if len(compare) > MAX_TXN_OPS:
            raise invalid("too many operations in txn request")
        if any(not c.key for c in compare):
            raise empty_key()
        _check_ops(success)
        _check_ops(failure)
        succeeded = all(self.holds(c) for c in compare)
        ops = success if succeeded else failure
        for op in ops:
            if isinstance(op, PutOp):
                if op.ignore_lease and self._at(op.key, self.revision) is None:
                    raise invalid("key not found")
                if op.lease and not lease_exists(op.lease):
                    raise lease_not_found()
        write = _Write(self.revision)
        responses = tuple(self._apply(op, write) for op in ops)
        self._commit(write)
        return TxnResult(succeeded, write.rev, responses), write.events

    def delete_keys(self, keys: Iterable[bytes]) -> list[Event]:
        """Delete ``keys`` (in key order) in one revision, as a lease revocation does."""
        write = _Write(self.revision)
        for key in sorted(keys):
            self._delete(key, b"", write)
        self._commit(write)
        return write.events

    def compact(self, revision: int) -> None:
        if revision <= self.compact_revision:
            raise compacted()
        if revision > self.revision:
            raise future_revision()
        self.compact_revision = revision
        keys: list[bytes] = []
        for key in self._keys:
            hist = self._history[key]
            i = bisect.bisect_right(hist, revision, key=lambda e: e[0])
            if i and hist[i - 1][1] is not None:
                i -= 1  # the key's state at the compact revision stays readable
            del hist[:i]
            if hist:
                keys.append(key)
            else:
                del self._history[key]
        self._keys = keys
        self._log = [
            e
            for e in self._log
            if e.kv.mod_revision > revision
            or (e.kv.mod_revision == revision and e.type is EventType.PUT)
        ]

    def _apply(self, op: TxnOp, write: _Write) -> RangeResult | PutResult | DeleteResult:
        match op:
            case GetOp():
                rev = write.rev
                return self._range(
                    op.key,
                    op.range_end,
                    rev,
                    rev,
                    op.limit,
                    op.keys_only,
                    op.count_only,
                    "none",
                    "key",
                )
            case PutOp():
                rev = write.begin + 1
                prev = self._at(op.key, rev)
                lease = prev.lease if op.ignore_lease and prev is not None else op.lease
                if prev is None:
                    kv = KeyValue(op.key, op.value, rev, rev, 1, lease)
                else:
                    kv = KeyValue(
                        op.key, op.value, prev.create_revision, rev, prev.version + 1, lease
                    )
                self._record(op.key, rev, kv)
                write.events.append(Event(EventType.PUT, kv))
                return PutResult(rev, prev if op.prev_kv else None)
            case DeleteOp():
                gone = self._delete(op.key, op.range_end, write)
                return DeleteResult(write.rev, len(gone), tuple(gone) if op.prev_kv else ())
        raise TypeError(f"not a transaction op: {op!r}")

    def _delete(self, key: bytes, end: bytes, write: _Write) -> list[KeyValue]:
        rev = write.begin + 1
        gone = self._read(key, end, write.rev)
        for kv in gone:
            self._record(kv.key, rev, None)
            write.events.append(Event(EventType.DELETE, KeyValue(kv.key, b"", 0, rev, 0, 0)))
        return gone

    def _record(self, key: bytes, rev: int, kv: KeyValue | None) -> None:
        hist = self._history.get(key)
        if hist is None:
            hist = self._history[key] = []
            bisect.insort(self._keys, key)
        hist.append((rev, kv))

    def _commit(self, write: _Write) -> None:
        if write.events:
            self.revision = write.begin + 1
            self._log.extend(write.events)
