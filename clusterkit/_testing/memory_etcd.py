"""An in-memory etcd v3 on the Trio clock, for deterministic, virtual-time tests.

Theory of operation
-------------------
:class:`MemoryEtcd` is the server: etcd's multi-version key space (``memory_mvcc``), its
leases and its watchers, all in the Trio thread. Every request runs to completion without
awaiting, so each one is atomic, exactly as etcd applies one raft entry at a time.
:class:`MemoryEtcdClient` (``store.client()``) is the client: the same methods, arguments,
return types and exceptions as :class:`clusterkit.EtcdClient`, so code under test takes either.
``tests/contract`` runs one behavioural suite against this and real etcd servers; what it
asserts is what this module promises.

Revisions follow etcd: one counter, 1 when empty, +1 per write transaction however many keys
it touches; ``create_revision``/``mod_revision``/``version`` per key as etcd keeps them.

Time is ``trio.current_time()``, so under ``trio.testing.MockClock`` a test runs minutes of
cluster life in milliseconds, and the same seed gives the same run. A lease dies at exactly
``granted TTL`` after its last keepalive reached the store (etcd's lessor adds up to 0.5 s);
its keys are deleted in one revision per lease, in key order, as etcd's revoke does. Expiry
needs no background task: every request first expires the leases that are due, and a watch
consumer that waits also wakes at the next lease deadline, so watchers see the DELETE events
at that very instant. Nothing can observe the store in between, so the history is the same
as if a reaper had run at the deadline.

Watches start when their ``async with`` is entered. A watch from the past first replays
history (in batches of at most 1000 revisions, each carrying the store revision at replay
time), then gets one batch per later revision with its matching events. A start revision
*below* the compact revision fails with :class:`RevisionCompacted` whose
``compact_revision`` is the compact revision; starting *at* it is allowed, as on the real
server. Like the real client's, a watch whose consumer falls ``QUEUE_LIMIT`` batches
behind ends with :class:`WatchOverflow`. Progress notifications are not sent.

Faults, for scenario tests:

- ``store.fail(EtcdUnavailable)`` / ``store.heal()``: every request of every client fails,
  open watches end with the error. Leases keep expiring (clients cut off from a healthy
  etcd) unless ``freeze_leases=True`` (etcd without quorum: heal renews every lease).
- ``client.cut()`` / ``client.restore()``: one client loses etcd; the others go on.
- ``store.compact(rev)``: compaction, as ``EtcdClient.compact``.
- ``latency=``: a one-way delay, in Trio time, for every request and its answer.

What differs from etcd: lease ids are small counters, not etcd's member-derived ids; the
member list, status and ``db_size`` are synthetic; expiry is exact instead of up to 0.5 s
late; a cut-off client fails at once with :class:`EtcdUnavailable` where a real partition
could also time out; ties in non-key sorts keep key order (etcd leaves larger sets in an
unspecified order).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .memory_client import MemoryEtcdClient
from .memory_store import MemoryEtcd
from .memory_watch import MemoryWatch

__all__ = ["MemoryEtcd", "MemoryEtcdClient", "MemoryWatch", "open_memory_etcd"]


@asynccontextmanager
async def open_memory_etcd(
    *, min_lease_ttl: int = 1, latency: float = 0.0, request_timeout: float = 5.0
) -> AsyncIterator[MemoryEtcd]:
    """Open an in-memory etcd for the duration of the ``async with`` block.

    Args:
        min_lease_ttl: the smallest lease TTL granted; smaller requests are raised to it.
        latency: one-way delay of every request and answer, in seconds of Trio time.
        request_timeout: the ``config.request_timeout`` of the clients it makes.

    Yields:
        The :class:`MemoryEtcd`; make clients with ``store.client()``. On exit the store is
        closed: open watches end and later requests fail with :class:`EtcdUnavailable`.
    """
    store = MemoryEtcd(
        min_lease_ttl=min_lease_ttl, latency=latency, request_timeout=request_timeout
    )
    try:
        yield store
    finally:
        store.close()
