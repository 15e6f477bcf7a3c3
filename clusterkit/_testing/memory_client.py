"""The client half of the memory etcd: ``EtcdClient``'s API, served by a :class:`MemoryEtcd`.

Every method takes the same arguments, returns the same types and raises the same errors as
:class:`clusterkit.EtcdClient`'s; argument checks that the real client makes before calling
etcd (``prefix`` with ``range_end``, unknown filters or sort orders) fail the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

import trio

from .._errors import EtcdError, EtcdTimeout, EtcdUnavailable, LeaseNotFound
from .._etcd.channel import EtcdConfig
from .._etcd.client import read_all_pages
from .._etcd.lease import KeepAlivePump
from .._etcd.types import (
    Compare,
    DeleteOp,
    DeleteResult,
    KeepAlive,
    Key,
    KeyValue,
    Lease,
    LeaseInfo,
    Member,
    PutOp,
    PutResult,
    RangeResult,
    Status,
    TxnOp,
    TxnResult,
    prefix_end,
    to_bytes,
)
from .memory_watch import MemoryWatch

if TYPE_CHECKING:
    from .memory_store import MemoryEtcd

T = TypeVar("T")
_SORT_ORDERS = ("none", "ascend", "descend")
_SORT_TARGETS = ("key", "version", "create", "mod", "value")
_FILTERS = ("noput", "nodelete")


def _range_end(key: bytes, prefix: bool, range_end: Key | None) -> bytes:
    if prefix and range_end is not None:
        raise ValueError("give prefix=True or range_end, not both")
    if prefix:
        return prefix_end(key)
    return to_bytes(range_end) if range_end is not None else b""


class MemoryEtcdClient:
    """A client of a :class:`MemoryEtcd` with the API of :class:`clusterkit.EtcdClient`.

    Get one from ``store.client()``. Beyond the real client's API it has the fault knobs
    :meth:`cut` and :meth:`restore`.
    """

    def __init__(self, store: MemoryEtcd, *, request_timeout: float = 5.0) -> None:
        self.store = store
        self.config = EtcdConfig(endpoints=("memory:0",), request_timeout=request_timeout)
        self._watches: dict[MemoryWatch, None] = {}
        self._ids = itertools.count(1)
        self._cut = False
        self._closed = False
        self._pumps: set[KeepAlivePump] = set()
        self.requests = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "cut" if self._cut else "connected"
        return f"<MemoryEtcdClient {state} watches={len(self._watches)}>"

    def statistics(self) -> dict[str, int]:
        """Counters, with the keys of ``EtcdClient.statistics()`` and a request count."""
        return {
            "watch_watches": len(self._watches),
            "watch_stream_open": int(bool(self._watches)),
            "keepalive_pending": 0,
            "keepalive_stream_open": 0,
            "keepalive_pumps": len(self._pumps),
            "reauthentications": 0,
            "requests": self.requests,
        }

    # -- faults ---------------------------------------------------------------------------

    @property
    def is_cut(self) -> bool:
        """True between :meth:`cut` and :meth:`restore`."""
        return self._cut

    def cut(self) -> None:
        """Cut this client off: its requests fail and its watches end with EtcdUnavailable.

        The store's clock keeps running, so this client's leases expire unless restored.
        """
        self._cut = True
        error = EtcdUnavailable("memory etcd: this client is cut off", code="UNAVAILABLE")
        for watch in list(self._watches):
            watch.end(error)

    def restore(self) -> None:
        """Undo :meth:`cut`."""
        self._cut = False

    # -- plumbing -------------------------------------------------------------------------

    async def _request(self, apply: Callable[[], T], timeout: float | None = None) -> T:
        """Carry one request to the store and its answer back, with the store's latency."""
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        timeout = timeout or self.config.request_timeout
        latency = self.store.latency
        try:
            with trio.fail_after(timeout):
                if latency:
                    await trio.sleep(latency)
                else:
                    await trio.lowlevel.checkpoint()
                self.store._admit(self)
                self.requests += 1
                result = apply()
                if latency:
                    await trio.sleep(latency)
                    if self._cut or self.store._failure is not None:
                        raise EtcdUnavailable(
                            "memory etcd: the answer was lost", code="UNAVAILABLE"
                        )
        except trio.TooSlowError:
            raise EtcdTimeout("memory etcd: deadline exceeded", code="DEADLINE_EXCEEDED") from None
        return result

    # -- KV -------------------------------------------------------------------------------

    async def get(
        self, key: Key, *, revision: int = 0, serializable: bool = False
    ) -> KeyValue | None:
        """Read one key (``None`` when it does not exist at ``revision``)."""
        result = await self.range(key, revision=revision, serializable=serializable)
        return result.kvs[0] if result.kvs else None

    async def range(
        self,
        key: Key,
        *,
        prefix: bool = False,
        range_end: Key | None = None,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        serializable: bool = False,
        sort_order: str = "none",
        sort_target: str = "key",
    ) -> RangeResult:
        """Read a key, a prefix or ``[key, range_end)``, as ``EtcdClient.range``."""
        k = to_bytes(key)
        end = _range_end(k, prefix, range_end)
        if sort_order not in _SORT_ORDERS:
            raise KeyError(sort_order)
        if sort_target not in _SORT_TARGETS:
            raise KeyError(sort_target)
        return await self._request(
            lambda: self.store._range(
                k,
                end,
                revision=revision,
                limit=limit,
                keys_only=keys_only,
                count_only=count_only,
                sort_order=sort_order,
                sort_target=sort_target,
            )
        )

    async def get_prefix(
        self, prefix: Key, *, revision: int = 0, page_size: int = 1000
    ) -> RangeResult:
        """Read every key under ``prefix`` at ONE revision, in pages of ``page_size`` keys."""
        return await read_all_pages(self.range, prefix, revision, page_size)

    async def put(
        self,
        key: Key,
        value: Key,
        *,
        lease: int = 0,
        prev_kv: bool = False,
        ignore_lease: bool = False,
    ) -> PutResult:
        """Write ``value`` to ``key``, optionally attached to ``lease``."""
        op = PutOp(to_bytes(key), to_bytes(value), lease, prev_kv, ignore_lease)
        result = await self._request(lambda: self.store._txn((), (op,), ()))
        response = result.responses[0]
        assert isinstance(response, PutResult)
        return response

    async def delete(
        self, key: Key, *, prefix: bool = False, range_end: Key | None = None, prev_kv: bool = False
    ) -> DeleteResult:
        """Delete a key, a prefix, or ``[key, range_end)``."""
        k = to_bytes(key)
        op = DeleteOp(k, _range_end(k, prefix, range_end), prev_kv)
        result = await self._request(lambda: self.store._txn((), (op,), ()))
        response = result.responses[0]
        assert isinstance(response, DeleteResult)
        return response

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[TxnOp] = (),
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        """Run ``success`` if every ``compare`` holds, else ``failure``, in one revision."""
        compare, success, failure = tuple(compare), tuple(success), tuple(failure)
        return await self._request(lambda: self.store._txn(compare, success, failure))

    async def compact(self, revision: int, *, physical: bool = False) -> None:
        """Discard history before ``revision``. Watches from older revisions then fail."""
        await self._request(lambda: self.store.compact(revision))

    # -- Watch ----------------------------------------------------------------------------

    def watch(
        self,
        key: Key,
        *,
        prefix: bool = False,
        range_end: Key | None = None,
        start_revision: int = 0,
        prev_kv: bool = False,
        progress_notify: bool = False,
        filters: Sequence[str] = (),
    ) -> MemoryWatch:
        """Watch a key, a prefix or a range; use as ``async with client.watch(...) as w:``.

        ``progress_notify`` is accepted and ignored (the memory etcd sends no progress
        notifications).
        """
        k = to_bytes(key)
        end = _range_end(k, prefix, range_end)
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        for f in filters:
            if f not in _FILTERS:
                raise ValueError(f"unknown watch filter {f!r}; use {sorted(_FILTERS)}")
        request = (k, end, start_revision, prev_kv, tuple(filters))
        return MemoryWatch(self, next(self._ids), request)

    # -- Leases ---------------------------------------------------------------------------

    async def lease_grant(self, ttl: int, *, lease_id: int = 0) -> Lease:
        """Create a lease. The returned ``ttl`` is what was granted (at least the minimum)."""
        return await self._request(lambda: self.store._lease_grant(ttl, lease_id))

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke a lease, deleting every key attached to it (in one revision).

        Raises:
            LeaseNotFound: the lease had already expired or been revoked.
        """
        await self._request(lambda: self.store._lease_revoke(lease_id))

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> KeepAlive:
        """Refresh a lease once; it then lives ``ttl`` seconds from when the store got this.

        Raises:
            LeaseNotFound: the lease is gone.
        """
        sent_at = trio.current_time()
        ttl = await self._request(lambda: self.store._lease_keepalive(lease_id), timeout)
        return KeepAlive(lease_id, ttl, sent_at)

    @asynccontextmanager
    async def keepalive_pump(
        self, lease_id: int, interval: float, *, stall_limit: float
    ) -> AsyncIterator[KeepAlivePump]:
        """``EtcdClient.keepalive_pump``, driven by a Trio task on the Trio (virtual) clock.

        The same :class:`KeepAlivePump` API and errors; the task sends every ``interval``
        seconds and waits for each answer (the memory etcd answers in order anyway). Works
        under ``MockClock``, which the real client's pump refuses.
        """
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        pump = KeepAlivePump(
            lease_id,
            interval,
            stall_limit,
            clock=trio.current_time,
            offset=0.0,
            notify_soon=lambda fn: fn(),
        )
        self._pumps.add(pump)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_pump, pump)
                try:
                    yield pump
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._pumps.discard(pump)
            pump._stop(EtcdUnavailable("the keepalive pump was stopped"))

    async def _run_pump(self, pump: KeepAlivePump) -> None:
        while not pump.stopped and pump.failure is None and not pump._stalled():
            sent = trio.current_time()
            pump.sends += 1
            try:
                ka = await self.lease_keepalive(pump.lease_id, timeout=pump.interval)
            except LeaseNotFound:
                pump._acked(0, sent)
                return
            except EtcdError as exc:
                if self._closed:
                    return
                pump._stream_broke(exc)
            else:
                pump._acked(ka.ttl, sent)
            await trio.sleep_until(sent + pump.interval)

    async def lease_time_to_live(self, lease_id: int, *, keys: bool = False) -> LeaseInfo:
        """The lease's remaining TTL and granted TTL (``ttl == -1`` when it has expired)."""
        return await self._request(lambda: self.store._lease_time_to_live(lease_id, keys))

    # -- Cluster and maintenance ----------------------------------------------------------

    async def member_list(self) -> list[Member]:
        """The one member of the memory etcd."""
        member = Member(self.store.member_id, "memory", ("memory://0",), ("memory://0",))
        return await self._request(lambda: [member])

    async def status(self) -> Status:
        """The store's status; ``version`` is ``"3.5.0-memory"``."""
        store = self.store
        return await self._request(
            lambda: Status(
                store.version, store._size(), store.member_id, store.member_id, store.raft_index, 2
            )
        )

    def open_streams(self) -> None:
        """Nothing to open: the memory etcd has no streams (kept for API parity)."""

    # -- lifetime -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the client: its watches end, later calls fail. Idempotent."""
        if self._closed:
            return
        self._closed = True
        error = EtcdUnavailable("the etcd client was closed")
        for pump in list(self._pumps):
            pump._stop(error)
        for watch in list(self._watches):
            watch.end(error)
        self.store._forget_client(self)
        await trio.lowlevel.checkpoint()
