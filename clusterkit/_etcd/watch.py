"""All watches of a client multiplexed over one etcd Watch stream.

Theory of operation
-------------------
etcd lets one Watch stream carry many watchers, each named by a ``watch_id`` that the client
may choose (etcd >= 3.4). The hub opens the stream lazily (with ``hasleader=true`` metadata,
so a member that loses its raft leader ends the stream instead of going silent), gives every
watch a fresh id, and routes each response to its watch's queue. The stream runs on the
client's HTTP/2 channel in the Trio thread (http2.py): its responses are handed to the hub by
the connection's reader task as they are read, with no thread, however many watches there are.

Each watch's queue holds responses in arrival order and ends with at most one terminal error,
so a consumer always sees every event delivered before the failure and then the failure:

- ``canceled`` with ``compact_revision != 0`` -> :class:`RevisionCompacted`; the caller must
  re-read at a current revision and watch from there + 1 (resuming from the compact revision
  would skip events);
- ``canceled`` for another reason -> the error etcd gave (permission denied, ...);
- the stream failed -> the translated gRPC error (usually :class:`EtcdUnavailable`), for
  every watch on it; the next watch opens a new stream (possibly on another endpoint).

Events are never dropped or merged: the hub does not ask for fragments, and one etcd response
becomes one :class:`WatchBatch`. Flow control is the stream's HTTP/2 window: a response's bytes
are returned to it when its batch is taken from the queue (or the watch is closed).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import trio

from .._errors import (
    EtcdError,
    EtcdTimeout,
    EtcdUnavailable,
    InvalidAuthToken,
    RevisionCompacted,
    WatchOverflow,
)
from .http2 import BidiStream
from .pb.etcdserverpb import rpc_pb2
from .status import BY_MESSAGE, translate
from .types import Event, EventType, KeyValue, WatchBatch

if TYPE_CHECKING:
    from .client import EtcdClient

QUEUE_LIMIT = 4096  # responses a watch may hold unconsumed before it is failed

_FILTERS = {
    "noput": rpc_pb2.WatchCreateRequest.NOPUT,
    "nodelete": rpc_pb2.WatchCreateRequest.NODELETE,
}


def _batch(resp: Any) -> WatchBatch:
    events = tuple(
        Event(
            EventType.DELETE if ev.type == 1 else EventType.PUT,
            KeyValue.from_pb(ev.kv),
            KeyValue.from_pb(ev.prev_kv) if ev.HasField("prev_kv") else None,
        )
        for ev in resp.events
    )
    return WatchBatch(resp.header.revision, events, progress=not events)


class Watch:
    """One watch: an async iterator of :class:`WatchBatch`, used as an async context manager.

    Raises from iteration:
        RevisionCompacted: the start revision was compacted (``compact_revision`` is set).
        EtcdUnavailable: the stream to etcd broke.
        EtcdError: etcd cancelled the watch for another reason.
    """

    def __init__(self, hub: WatchHub, watch_id: int, request: Any) -> None:
        self._hub = hub
        self.watch_id = watch_id
        self._request = request
        self._stream: BidiStream | None = None  # credits go back to the stream they came from
        self._queue: deque[tuple[WatchBatch | EtcdError, int]] = deque()
        self._wakeup = trio.Event()
        self._created = trio.Event()
        self._closed = False
        self._failed = False

    def __repr__(self) -> str:
        return f"<Watch id={self.watch_id} queued={len(self._queue)} closed={self._closed}>"

    # Called by the hub, in the Trio thread.
    def _push(self, item: WatchBatch, credit: int) -> None:
        if self._closed or self._failed:
            self._release(credit)
            return
        if len(self._queue) >= QUEUE_LIMIT:
            # This consumer is too slow: fail this watch rather than stall every other watch
            # of the client (they share one stream and its flow control).
            self._release(credit)
            self._fail(WatchOverflow(f"watch {self.watch_id} fell {QUEUE_LIMIT} responses behind"))
            self._hub.cancel(self)
            return
        self._queue.append((item, credit))
        self._wakeup.set()

    def _mark_created(self) -> None:
        self._created.set()

    def _fail(self, error: EtcdError) -> None:
        """End the watch with ``error`` after the batches already queued (their credits are
        returned now: nothing more will arrive for this watch)."""
        if self._failed or self._closed:
            return
        self._failed = True
        held = sum(credit for _, credit in self._queue)
        self._queue = deque((item, 0) for item, _ in self._queue)
        self._release(held)
        self._queue.append((error, 0))
        self._wakeup.set()
        self._created.set()

    def _release(self, n: int) -> None:
        if n and self._stream is not None:
            self._stream.release(n)

    async def __aenter__(self) -> Watch:
        try:
            with trio.fail_after(self._hub.timeout):
                await self._hub.register(self)
                await self._created.wait()
        except trio.TooSlowError:
            await self.aclose()
            raise EtcdTimeout("watch was not confirmed by etcd in time") from None
        except BaseException:
            await self.aclose()
            raise
        if self._queue and isinstance(self._queue[0][0], EtcdError):
            error = self._queue[0][0]
            await self.aclose()
            raise error
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[WatchBatch]:
        return self

    async def __anext__(self) -> WatchBatch:
        while True:
            if not self._queue:
                if self._closed:
                    raise StopAsyncIteration
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            # The cancellation point comes *before* taking the batch, so a cancelled
            # caller never loses one.
            await trio.lowlevel.checkpoint()
            if not self._queue:
                continue
            item, credit = self._queue[0]
            if isinstance(item, EtcdError):
                raise item  # stays at the head: the watch stays failed
            self._queue.popleft()
            self._release(credit)
            return item

    def take_ready(self) -> list[WatchBatch]:
        """Every batch that has already arrived, without waiting (and without a checkpoint).

        Stops before a terminal error, which the next ``__anext__`` raises.
        """
        taken: list[WatchBatch] = []
        while self._queue and not isinstance(self._queue[0][0], EtcdError):
            item, credit = self._queue.popleft()
            self._release(credit)
            assert not isinstance(item, EtcdError)
            taken.append(item)
        return taken

    async def aclose(self) -> None:
        """Cancel the watch on the server and release everything it holds."""
        if self._closed:
            return
        self._closed = True
        self._release(sum(credit for _, credit in self._queue))
        self._queue.clear()
        self._wakeup.set()
        self._hub.cancel(self)
        await trio.lowlevel.checkpoint()


class WatchHub:
    """Multiplexes every :class:`Watch` of a client over one gRPC Watch stream."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self._stream: BidiStream | None = None
        self._watches: dict[int, Watch] = {}
        self._ids = itertools.count(1)
        # Ids of watches etcd has not confirmed yet, oldest first. etcd answers creates in
        # order, and refuses some (permission denied) with watch_id -1 instead of our id.
        self._unconfirmed: deque[int] = deque()
        self.timeout = client.config.request_timeout

    def __repr__(self) -> str:
        return (
            f"<WatchHub watches={len(self._watches)} stream={'open' if self._stream else 'none'}>"
        )

    def statistics(self) -> dict[str, int]:
        return {"watches": len(self._watches), "stream_open": int(self._stream is not None)}

    def warm(self) -> None:
        """Open the stream now (it stays open with no watches; see EtcdClient.open_streams)."""
        self._ensure_stream()

    def watch(
        self,
        key: bytes,
        range_end: bytes,
        *,
        start_revision: int,
        prev_kv: bool,
        progress_notify: bool,
        filters: tuple[str, ...],
    ) -> Watch:
        for f in filters:
            if f not in _FILTERS:
                raise ValueError(f"unknown watch filter {f!r}; use {sorted(_FILTERS)}")
        watch_id = next(self._ids)
        create = rpc_pb2.WatchCreateRequest(
            key=key,
            range_end=range_end,
            start_revision=start_revision,
            progress_notify=progress_notify,
            prev_kv=prev_kv,
            watch_id=watch_id,
            filters=[_FILTERS[f] for f in filters],
        )
        return Watch(self, watch_id, rpc_pb2.WatchRequest(create_request=create))

    async def register(self, watch: Watch) -> None:
        """Send the watch's create request (on entering ``async with``)."""
        await self._client.ensure_stream_auth()
        if watch._closed:
            return
        stream = self._ensure_stream()
        watch._stream = stream
        self._watches[watch.watch_id] = watch
        self._unconfirmed.append(watch.watch_id)
        stream.send(watch._request)

    def cancel(self, watch: Watch) -> None:
        if self._watches.pop(watch.watch_id, None) is None:
            return
        if self._stream is not None and not self._stream.closed:
            cancel = rpc_pb2.WatchCancelRequest(watch_id=watch.watch_id)
            self._stream.send(rpc_pb2.WatchRequest(cancel_request=cancel))

    def _ensure_stream(self) -> BidiStream:
        if self._stream is None or self._stream.closed:
            endpoint = self._client.endpoints.current
            stream: BidiStream

            def on_error(error: BaseException | None) -> None:
                self._stream_failed(stream, endpoint, error)

            stream = self._client.open_stream(
                endpoint,
                "watch",
                "Watch",
                metadata=self._client.stream_metadata(),
                on_response=self._on_response,
                on_error=on_error,
            )
            self._stream = stream
        return self._stream

    def _on_response(self, resp: Any) -> None:
        watch_id = resp.watch_id
        if resp.created and self._unconfirmed:
            oldest = self._unconfirmed.popleft()
            if watch_id != oldest:
                if watch_id in self._unconfirmed:  # pragma: no cover - etcd answers in order
                    self._unconfirmed.remove(watch_id)
                    self._unconfirmed.appendleft(oldest)
                else:
                    watch_id = oldest  # a refusal carries watch_id -1
        watch = self._watches.get(watch_id)
        stream = self._stream
        assert stream is not None
        if watch is None:
            stream.release(1)
            return
        if resp.created:
            watch._mark_created()
        if resp.canceled:
            self._watches.pop(watch_id, None)
            if resp.compact_revision:
                err: EtcdError = RevisionCompacted(
                    f"watch start revision compacted (compact revision {resp.compact_revision})",
                    compact_revision=resp.compact_revision,
                )
            else:
                err = _cancel_error(resp.cancel_reason)
            watch._fail(err)
            stream.release(1)
            return
        if resp.created and not resp.events:
            stream.release(1)
            return
        watch._push(_batch(resp), 1)

    def _stream_failed(
        self, stream: BidiStream, endpoint: Any, error: BaseException | None
    ) -> None:
        if self._stream is stream:
            self._stream = None
        if error is None:
            return
        if isinstance(error, grpc.RpcError):
            err = translate(error)
        else:
            err = EtcdUnavailable(f"watch stream ended: {error!r}")
        if isinstance(err, EtcdUnavailable):
            self._client.endpoints.failed(endpoint)
        if isinstance(err, InvalidAuthToken):
            self._client.stream_auth_failed()
        watches, self._watches = self._watches, {}
        self._unconfirmed.clear()
        for watch in watches.values():
            watch._fail(err)

    async def aclose(self) -> None:
        for watch in list(self._watches.values()):
            watch._fail(EtcdUnavailable("the etcd client was closed"))
        self._watches.clear()
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()


def _cancel_error(reason: str) -> EtcdError:
    lowered = reason.lower()
    for fragment, cls in BY_MESSAGE:
        if fragment in lowered:
            return cls(reason)
    return EtcdError(reason or "watch cancelled by etcd")
