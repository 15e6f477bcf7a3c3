"""The server half of the memory etcd: the key space, leases, watchers, and the fault knobs.

See :mod:`clusterkit._testing.memory_etcd` for the theory of operation.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import trio

from .._errors import (
    EtcdError,
    EtcdUnavailable,
    LeaseNotFound,
    PreconditionFailed,
    RevisionCompacted,
)
from .._etcd.types import (
    Compare,
    Event,
    EventType,
    Lease,
    LeaseInfo,
    RangeResult,
    TxnOp,
    TxnResult,
    WatchBatch,
)
from .memory_client import MemoryEtcdClient
from .memory_mvcc import Mvcc, in_range, invalid, lease_not_found

VERSION = "3.5.0-memory"
MAX_LEASE_TTL = 9_000_000_000  # etcd's MaxLeaseTTL
WATCH_BATCH_MAX_REVS = 1000  # etcd sends a replay in batches of at most this many revisions
_FIRST_LEASE_ID = 0x6D656D0000000001


class WatchSink(Protocol):
    """What the store needs from a watch: somewhere to put batches and its end."""

    def deliver(self, batch: WatchBatch) -> None: ...

    def end(self, error: EtcdError) -> None: ...

    def poke(self) -> None: ...


@dataclass(eq=False, slots=True)
class Watcher:
    """One registered watch: its range, options, and the next revision it has to see."""

    key: bytes
    end: bytes
    next_rev: int
    prev_kv: bool
    filters: frozenset[str]
    sink: WatchSink


@dataclass(eq=False, slots=True)
class _Lease:
    id: int
    ttl: int
    expiry: float
    keys: set[bytes] = field(default_factory=set)


class MemoryEtcd:
    """An in-memory etcd v3 server on the Trio clock; open it with ``open_memory_etcd()``.

    Args:
        min_lease_ttl: the smallest TTL granted (etcd's is ceil(1.5 x election timeout)).
        latency: one-way delay, in seconds of Trio time, of every request and its answer.
        request_timeout: the ``config.request_timeout`` of the clients it makes.
    """

    def __init__(
        self, *, min_lease_ttl: int = 1, latency: float = 0.0, request_timeout: float = 5.0
    ) -> None:
        if min_lease_ttl < 1:
            raise ValueError("min_lease_ttl must be >= 1 second")
        if latency < 0:
            raise ValueError("latency must be >= 0")
        self.min_lease_ttl = min_lease_ttl
        self.latency = latency
        self.request_timeout = request_timeout
        self.version = VERSION
        self.member_id = 0x6D656D6F7279  # "memory"
        self._mvcc = Mvcc()
        self._leases: dict[int, _Lease] = {}
        self._key_lease: dict[bytes, int] = {}
        self._lease_ids = itertools.count(_FIRST_LEASE_ID)
        self._watchers: dict[Watcher, None] = {}  # an ordered set
        self._clients: dict[MemoryEtcdClient, None] = {}
        self._failure: EtcdError | type[EtcdError] | None = None
        self._frozen = False
        self._closed = False
        self.raft_index = 1
        self.expired_leases = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "failed" if self._failure else "up"
        return (
            f"<MemoryEtcd {state} revision={self._mvcc.revision} leases={len(self._leases)} "
            f"watches={len(self._watchers)}>"
        )

    # -- the user's knobs -----------------------------------------------------------------

    def client(self, *, request_timeout: float | None = None) -> MemoryEtcdClient:
        """A new client of this store, with the same API as :class:`clusterkit.EtcdClient`."""
        client = MemoryEtcdClient(self, request_timeout=request_timeout or self.request_timeout)
        self._clients[client] = None
        return client

    @property
    def revision(self) -> int:
        """The current store revision (leases that are due expire first)."""
        self._tick()
        return self._mvcc.revision

    @property
    def compact_revision(self) -> int:
        """The revision of the last compaction (0: none yet)."""
        return max(self._mvcc.compact_revision, 0)

    def compact(self, revision: int) -> None:
        """Compact history before ``revision``, as ``EtcdClient.compact`` does.

        Raises:
            RevisionCompacted: ``revision`` is not newer than the last compaction.
            InvalidRequest: ``revision`` is in the future.
        """
        self._tick()
        self._mvcc.compact(revision)
        self.raft_index += 1

    def fail(
        self, error: EtcdError | type[EtcdError] = EtcdUnavailable, *, freeze_leases: bool = False
    ) -> None:
        """Make every request of every client fail with ``error`` until :meth:`heal`.

        Open watches end with ``error``. By default the server keeps its clock running, as
        when clients are cut off from a healthy etcd: leases nobody can refresh expire. With
        ``freeze_leases=True`` it behaves like etcd without a quorum instead: nothing expires,
        and :meth:`heal` renews every lease by its TTL (a new raft leader does that).
        """
        self._tick()
        self._failure = error
        self._frozen = self._frozen or freeze_leases
        for w in list(self._watchers):
            self._end(w, self._failure_error())

    def heal(self) -> None:
        """Undo :meth:`fail`."""
        self._failure = None
        if self._frozen:
            self._frozen = False
            now = trio.current_time()
            for lease in self._leases.values():
                lease.expiry = max(lease.expiry, now + lease.ttl)
        self._poke()

    def close(self) -> None:
        """Shut the server down: open watches end and every later request fails."""
        self._closed = True
        for w in list(self._watchers):
            self._end(w, EtcdUnavailable("the memory etcd was closed", code="UNAVAILABLE"))

    def statistics(self) -> dict[str, int]:
        """Counters for tests and debugging."""
        self._tick()
        return {
            "revision": self._mvcc.revision,
            "compact_revision": self.compact_revision,
            "keys": self._mvcc.live_keys(),
            "leases": len(self._leases),
            "watches": len(self._watchers),
            "clients": len(self._clients),
            "expired_leases": self.expired_leases,
            "failed": int(self._failure is not None),
        }

    # -- admission, time and faults (for the client) --------------------------------------

    def _admit(self, client: MemoryEtcdClient) -> None:
        """Raise what a request from ``client`` meets now; expire the leases that are due."""
        if self._closed:
            raise EtcdUnavailable("the memory etcd was closed", code="UNAVAILABLE")
        if self._failure is not None:
            raise self._failure_error()
        if client.is_cut:
            raise EtcdUnavailable("memory etcd: this client is cut off", code="UNAVAILABLE")
        self._tick()

    def _failure_error(self) -> EtcdError:
        failure = self._failure
        if isinstance(failure, EtcdError):
            return copy.copy(failure)  # a fresh object, so tracebacks do not pile up
        assert failure is not None
        code = "UNAVAILABLE" if issubclass(failure, EtcdUnavailable) else None
        return failure("memory etcd: failed on purpose (MemoryEtcd.fail)", code=code)

    def _tick(self) -> None:
        """Expire every lease whose deadline has passed, oldest deadline first."""
        if self._frozen or not self._leases or not trio.lowlevel.in_trio_run():
            return
        now = trio.current_time()
        due = [lease for lease in self._leases.values() if lease.expiry <= now]
        for lease in sorted(due, key=lambda lease: (lease.expiry, lease.id)):
            self.expired_leases += 1
            self._revoke(lease)

    def _next_expiry(self) -> float:
        if self._frozen or self._closed or not self._leases:
            return math.inf
        return min(lease.expiry for lease in self._leases.values())

    def _poke(self) -> None:
        for w in self._watchers:
            w.sink.poke()

    def _forget_client(self, client: MemoryEtcdClient) -> None:
        self._clients.pop(client, None)

    # -- KV -------------------------------------------------------------------------------

    def _range(
        self,
        key: bytes,
        end: bytes,
        *,
        revision: int,
        limit: int,
        keys_only: bool,
        count_only: bool,
        sort_order: str,
        sort_target: str,
    ) -> RangeResult:
        return self._mvcc.range(
            key,
            end,
            revision=revision,
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
            sort_order=sort_order,
            sort_target=sort_target,
        )

    def _txn(
        self, compare: Sequence[Compare], success: Sequence[TxnOp], failure: Sequence[TxnOp]
    ) -> TxnResult:
        result, events = self._mvcc.txn(compare, success, failure, self._leases.__contains__)
        self.raft_index += 1
        self._committed(events)
        return result

    def _committed(self, events: list[Event]) -> None:
        """Keep leases' key sets up to date and tell the watchers about a new revision."""
        if not events:
            return
        for ev in events:
            key = ev.kv.key
            old = self._key_lease.pop(key, 0)
            new = ev.kv.lease if ev.type is EventType.PUT else 0
            if old != new and (lease := self._leases.get(old)) is not None:
                lease.keys.discard(key)
            if new:
                self._key_lease[key] = new
                self._leases[new].keys.add(key)
        rev = events[0].kv.mod_revision
        for w in list(self._watchers):
            if rev >= w.next_rev:
                w.next_rev = rev + 1
                self._send(w, events, rev)

    # -- watches --------------------------------------------------------------------------

    def _watch(
        self,
        key: bytes,
        end: bytes,
        *,
        start_revision: int,
        prev_kv: bool,
        filters: Sequence[str],
        sink: WatchSink,
    ) -> Watcher | None:
        """Register a watch; replay history first when it starts in the past."""
        current = self._mvcc.revision
        start = current + 1 if start_revision <= 0 else start_revision
        w = Watcher(key, end, start, prev_kv, frozenset(filters), sink)
        if start <= current:
            compact = self._mvcc.compact_revision
            if start < compact:  # etcd refuses only revisions *below* the compact revision
                sink.end(
                    RevisionCompacted(
                        f"watch start revision compacted (compact revision {compact})",
                        compact_revision=compact,
                    )
                )
                return None
            self._replay(w)
        self._watchers[w] = None
        return w

    def _replay(self, w: Watcher) -> None:
        current = self._mvcc.revision
        chunk: list[Event] = []
        revs = last = 0
        for ev in self._mvcc.events_since(w.next_rev):
            if not in_range(ev.kv.key, w.key, w.end):
                continue
            if ev.kv.mod_revision != last:
                if revs == WATCH_BATCH_MAX_REVS:
                    self._send(w, chunk, current)
                    chunk, revs = [], 0
                revs += 1
                last = ev.kv.mod_revision
            chunk.append(ev)
        self._send(w, chunk, current)
        w.next_rev = current + 1

    def _send(self, w: Watcher, events: list[Event], revision: int) -> None:
        selected: list[Event] = []
        for ev in events:
            if not in_range(ev.kv.key, w.key, w.end):
                continue
            if ("noput" if ev.type is EventType.PUT else "nodelete") in w.filters:
                continue
            selected.append(replace(ev, prev_kv=self._mvcc.prev_kv(ev)) if w.prev_kv else ev)
        if selected:  # etcd sends nothing when filters dropped every event
            w.sink.deliver(WatchBatch(revision, tuple(selected)))

    def _unwatch(self, w: Watcher) -> None:
        self._watchers.pop(w, None)

    def _end(self, w: Watcher, error: EtcdError) -> None:
        self._watchers.pop(w, None)
        w.sink.end(error)

    # -- leases ---------------------------------------------------------------------------

    def _lease_grant(self, ttl: int, lease_id: int) -> Lease:
        if ttl > MAX_LEASE_TTL:
            raise invalid("too large lease TTL", "OUT_OF_RANGE")
        if lease_id in self._leases:
            raise PreconditionFailed("etcdserver: lease already exists", code="FAILED_PRECONDITION")
        while not lease_id or lease_id in self._leases:
            lease_id = next(self._lease_ids)
        ttl = max(ttl, self.min_lease_ttl)
        self._leases[lease_id] = _Lease(lease_id, ttl, trio.current_time() + ttl)
        self.raft_index += 1
        self._poke()  # a watch waiting for a later deadline must wake for this one
        return Lease(lease_id, ttl)

    def _lease_revoke(self, lease_id: int) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise lease_not_found()
        self._revoke(lease)

    def _revoke(self, lease: _Lease) -> None:
        del self._leases[lease.id]
        self.raft_index += 1
        self._committed(self._mvcc.delete_keys(lease.keys))

    def _lease_keepalive(self, lease_id: int) -> int:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"lease {lease_id:x} has expired or was revoked")
        lease.expiry = trio.current_time() + lease.ttl
        return lease.ttl

    def _lease_time_to_live(self, lease_id: int, keys: bool) -> LeaseInfo:
        lease = self._leases.get(lease_id)
        if lease is None:
            return LeaseInfo(lease_id, -1, 0)
        remaining = int(lease.expiry - trio.current_time())  # etcd truncates too
        return LeaseInfo(lease_id, remaining, lease.ttl, tuple(sorted(lease.keys)) if keys else ())

    def _size(self) -> int:
        return self._mvcc.size()
