"""The drain watcher: an operator's ``clusterkit drain NODE`` reaches the node through etcd.

Theory of operation
-------------------
``clusterkit drain NODE`` writes ``P/drain/<node_id>`` (no lease: the request outlives the
node). Each node watches its own drain key; when it exists, the node logs who asked and calls
``ck.leave(drain=True)``: every partition is handed off (two-phase, make-before-break) and
the node leaves the cluster. The application's ``async with open_cluster(...)`` body goes on
running with a handle that has left (``ck.is_healthy()`` is False): it should exit, and a
supervisor that restarts it gets a node that drains again at once while the key exists —
a cordon. ``clusterkit undrain NODE`` deletes the key; the next start joins normally.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from .._core.keys import KeyLayout
from .._errors import EtcdError
from .._etcd.client import EtcdClient
from .._etcd.types import EventType

RETRY = 1.0


class DrainWatcher:
    """Actor: waits for this node's drain key, then drains the node (once)."""

    def __init__(
        self,
        etcd: EtcdClient,
        layout: KeyLayout,
        node_id: str,
        drain: Callable[[], Awaitable[None]],
        log: logging.Logger,
    ) -> None:
        self._etcd = etcd
        self._key = layout.drain(node_id)
        self._node_id = node_id
        self._drain = drain
        self._log = log
        self.requested = 0

    def statistics(self) -> dict[str, int]:
        return {"drain_requests": self.requested}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                reason = await self._wait_for_request()
                break
            except EtcdError as exc:
                self._log.debug("clusterkit %s: drain watch: %s", self._node_id, exc)
                await trio.sleep(RETRY)
        self.requested += 1
        self._log.warning(
            "clusterkit %s: drain requested through %s (%s): handing every partition off, "
            "then leaving",
            self._node_id,
            self._key.decode(),
            reason or "no reason given",
        )
        await self._drain()
        self._log.warning("clusterkit %s: drained and left the cluster", self._node_id)

    async def _wait_for_request(self) -> str:
        result = await self._etcd.range(self._key)
        if result.kvs:
            return result.kvs[0].value.decode(errors="replace")
        async with self._etcd.watch(self._key, start_revision=result.revision + 1) as watch:
            async for batch in watch:
                for event in batch.events:
                    if event.type is EventType.PUT:
                        return event.kv.value.decode(errors="replace")
        raise EtcdError("the drain watch ended")
