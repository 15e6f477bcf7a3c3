"""Fan-out of cluster events to ``ck.events()`` subscribers.

Publishing never blocks an actor: each subscriber has a bounded buffer, and one that falls
too far behind is dropped — its iterator raises :class:`EventStreamOverflow` after the
events it did receive — instead of stalling hooks or leadership.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType

import trio

from .._errors import EventStreamOverflow
from .._events import ClusterEvent

BUFFER = 10_000


class EventStream:
    """An ``async for`` iterator over this node's events; also an async context manager
    that unsubscribes on exit."""

    def __init__(self, hub: EventHub, receive: trio.MemoryReceiveChannel[ClusterEvent]) -> None:
        self._hub = hub
        self._receive = receive
        self.overflowed = False

    def __aiter__(self) -> AsyncIterator[ClusterEvent]:
        return self

    async def __anext__(self) -> ClusterEvent:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self.overflowed:
                raise EventStreamOverflow(
                    f"event subscriber fell more than {BUFFER} events behind and was dropped"
                ) from None
            raise StopAsyncIteration from None

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._hub.unsubscribe(self)
        await self._receive.aclose()


class EventHub:
    """Delivers every emitted event to every subscriber, without ever blocking."""

    def __init__(self) -> None:
        self._subscribers: dict[EventStream, trio.MemorySendChannel[ClusterEvent]] = {}
        self.emitted = 0
        self.closed = False

    def subscribe(self) -> EventStream:
        send, receive = trio.open_memory_channel[ClusterEvent](BUFFER)
        stream = EventStream(self, receive)
        if self.closed:
            send.close()  # the node has left: the stream ends at once
        else:
            self._subscribers[stream] = send
        return stream

    def unsubscribe(self, stream: EventStream) -> None:
        send = self._subscribers.pop(stream, None)
        if send is not None:
            send.close()

    def emit(self, event: ClusterEvent) -> None:
        self.emitted += 1
        for stream, send in list(self._subscribers.items()):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                stream.overflowed = True
                self.unsubscribe(stream)
            except trio.BrokenResourceError:
                self.unsubscribe(stream)

    def close(self) -> None:
        """End every subscriber's iteration (the node is leaving)."""
        self.closed = True
        for stream in list(self._subscribers):
            self.unsubscribe(stream)
