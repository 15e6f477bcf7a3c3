"""Watches on the memory etcd, with the protocol of :class:`clusterkit.etcd.Watch`."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING

import trio

from .._errors import EtcdError, EtcdUnavailable, WatchOverflow
from .._etcd.types import WatchBatch
from .._etcd.watch import QUEUE_LIMIT

if TYPE_CHECKING:
    from .memory_client import MemoryEtcdClient
    from .memory_store import Watcher

# key, range_end, start_revision, prev_kv, filters
WatchRequest = tuple[bytes, bytes, int, bool, tuple[str, ...]]


class MemoryWatch:
    """A watch on a :class:`MemoryEtcd`; the same protocol as :class:`clusterkit.etcd.Watch`.

    Use it as ``async with client.watch(...) as w: async for batch in w: ...``. As with the
    real client, the watch starts when the ``async with`` is entered, a consumer that falls
    ``QUEUE_LIMIT`` batches behind gets :class:`WatchOverflow`, and a cancelled ``__anext__``
    never loses a batch. While a consumer waits it also wakes at the store's next lease
    deadline, so expiring leases reach watchers on time with no other task running.

    Raises from iteration:
        RevisionCompacted: the start revision was compacted (``compact_revision`` is set).
        WatchOverflow: the consumer fell too far behind.
        EtcdUnavailable: the store failed, this client was cut off or closed.
    """

    def __init__(self, client: MemoryEtcdClient, watch_id: int, request: WatchRequest) -> None:
        self._client = client
        self.watch_id = watch_id
        self._request = request
        self._queue: deque[WatchBatch | EtcdError] = deque()
        self._wakeup = trio.Event()
        self._closed = False
        self._failed = False
        self._watcher: Watcher | None = None

    def __repr__(self) -> str:
        return f"<MemoryWatch id={self.watch_id} queued={len(self._queue)} closed={self._closed}>"

    # Called by the store.
    def deliver(self, batch: WatchBatch) -> None:
        if self._closed or self._failed:
            return
        if len(self._queue) >= QUEUE_LIMIT:
            self.end(WatchOverflow(f"watch {self.watch_id} fell {QUEUE_LIMIT} responses behind"))
            return
        self._queue.append(batch)
        self._wakeup.set()

    def end(self, error: EtcdError) -> None:
        if self._watcher is not None:
            self._client.store._unwatch(self._watcher)
            self._watcher = None
        self._client._watches.pop(self, None)
        if not self._closed and not self._failed:
            self._failed = True
            self._queue.append(error)
            self._wakeup.set()

    def poke(self) -> None:
        self._wakeup.set()

    async def __aenter__(self) -> MemoryWatch:
        await trio.lowlevel.checkpoint()
        client, store = self._client, self._client.store
        try:
            if client._closed:
                raise EtcdUnavailable("the etcd client is closed")
            store._admit(client)  # a stream that fails before etcd confirms the watch
        except EtcdError:
            await self.aclose()
            raise
        if not self._closed:
            client._watches[self] = None
            key, end, start_revision, prev_kv, filters = self._request
            self._watcher = store._watch(
                key,
                end,
                start_revision=start_revision,
                prev_kv=prev_kv,
                filters=filters,
                sink=self,
            )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[WatchBatch]:
        return self

    async def __anext__(self) -> WatchBatch:
        store = self._client.store
        while True:
            if not self._queue:
                if self._closed:
                    raise StopAsyncIteration
                self._wakeup = trio.Event()
                with trio.move_on_at(store._next_expiry()):
                    await self._wakeup.wait()
                store._tick()  # leases due now expire, which may deliver to this very watch
                continue
            # The cancellation point comes before taking the batch: a cancelled caller
            # never loses one.
            await trio.lowlevel.checkpoint()
            if not self._queue:
                continue
            item = self._queue[0]
            if isinstance(item, EtcdError):
                raise item  # stays at the head: the watch stays failed
            self._queue.popleft()
            return item

    def take_ready(self) -> list[WatchBatch]:
        """Every batch already delivered, without waiting (like ``Watch.take_ready``)."""
        taken: list[WatchBatch] = []
        while self._queue and not isinstance(self._queue[0], EtcdError):
            item = self._queue.popleft()
            assert not isinstance(item, EtcdError)
            taken.append(item)
        return taken

    async def aclose(self) -> None:
        """Cancel the watch. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._wakeup.set()
        if self._watcher is not None:
            self._client.store._unwatch(self._watcher)
            self._watcher = None
        self._client._watches.pop(self, None)
        await trio.lowlevel.checkpoint()
