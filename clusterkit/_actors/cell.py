"""A latest-value cell: how an actor publishes state that others only need the newest of.

Views and session state are *state*, not a queue of events: a subscriber that was busy only
needs the newest value, and a publisher must never block on a slow subscriber (the watcher
must keep routing views current even while the rebalancer computes a map). A bounded
memory channel would either block the publisher or drop the newest value; this cell keeps
exactly one value and a version number, and wakes everyone waiting for a newer version.
Commands between actors still go through memory channels.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


async def wait_first(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as the first of ``waits`` returns (the others are cancelled)."""
    async with trio.open_nursery() as nursery:

        async def run(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(run, wait)


class Latest(Generic[T]):
    """Holds the newest value of something; readers never block, waiters wake on change.

    ``value`` and ``version`` are plain attributes so hot-path readers (routing) pay one
    attribute load.
    """

    __slots__ = ("_changed", "name", "value", "version")

    def __init__(self, value: T, name: str = "") -> None:
        self.value = value
        self.version = 0
        self.name = name
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<Latest {self.name} v{self.version}: {self.value!r}>"

    def set(self, value: T) -> None:
        """Publish a new value and wake every waiter."""
        self.value = value
        self.version += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_newer(self, version: int) -> tuple[T, int]:
        """Wait until the version exceeds ``version``; return the newest value and version."""
        while self.version <= version:
            await self._changed.wait()
        return self.value, self.version

    async def wait_for(self, predicate: Callable[[T], bool]) -> T:
        """Wait until ``predicate(value)`` is true; return that value."""
        value, version = self.value, self.version
        while not predicate(value):
            value, version = await self.wait_newer(version)
        return value
