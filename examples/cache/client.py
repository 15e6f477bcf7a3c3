"""A client of the cache: routes each call to the right node itself (``clusterkit.open_client``)
and speaks the nodes' HTTP API.

``get(key, consistency="leader")`` asks the partition's leader (read-your-writes);
``consistency="any"`` asks one of its replicas at random (spreads the load; may be stale in the
window after a join, see ``node.py``). ``set`` and ``delete`` go to the leader. A node that is
not (or no longer) the right one redirects; a failover in progress answers 503 or drops the
connection: the client retries, re-routing with its routing client's newest view, until
``timeout``.
"""

from __future__ import annotations

import random
from urllib.parse import quote

import trio

import clusterkit
from examples.http_kv.http import request

Version = tuple[int, int]


class CacheUnavailable(Exception):
    """No node answered within the call's timeout."""


class CacheClient:
    """The cache's client (see the module docstring)."""

    def __init__(self, routing: clusterkit.RoutingClient, *, timeout: float = 15.0) -> None:
        self.routing = routing
        self.timeout = timeout
        self.retries = 0

    async def get(
        self, key: str, *, consistency: str = "leader"
    ) -> tuple[bytes | None, Version | None]:
        """``(value, version)``, or ``(None, None)`` on a miss."""
        if consistency not in ("leader", "any"):
            raise ValueError("consistency is 'leader' or 'any'")
        status, headers, body = await self._call(
            key, f"/get?key={quote(key)}&from={consistency}", any_replica=consistency == "any"
        )
        if status == 404:
            return None, None
        return body, _version(headers)

    async def set(self, key: str, value: str, *, ttl: float = 300.0) -> Version:
        """Store ``value`` for ``ttl`` seconds; its version once every live replica has it."""
        path = f"/set?key={quote(key)}&value={quote(value)}&ttl={ttl}"
        _, headers, _ = await self._call(key, path)
        version = _version(headers)
        assert version is not None
        return version

    async def delete(self, key: str) -> Version:
        """Invalidate ``key`` on every replica; the delete's version."""
        _, headers, _ = await self._call(key, f"/del?key={quote(key)}")
        version = _version(headers)
        assert version is not None
        return version

    async def _call(
        self, key: str, path: str, *, any_replica: bool = False
    ) -> tuple[int, dict[str, str], bytes]:
        with trio.move_on_after(self.timeout):
            while True:
                try:
                    pt = self.routing.get_partition(key)
                except clusterkit.ClusterNotReady:  # no map yet: the nodes are forming it
                    await trio.sleep(0.1)
                    continue
                node = (
                    random.choice(self.routing.get_replicas(pt) or [None])
                    if any_replica
                    else self.routing.get_leader(pt)
                )
                if node is not None and node.http_addr():
                    try:
                        answer = await request(node.http_addr() + path, timeout=3.0)
                        if answer[0] in (200, 404):
                            return answer
                        if answer[0] == 400:
                            raise ValueError(answer[2].decode(errors="replace"))
                    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                        pass
                self.retries += 1
                await trio.sleep(0.05)
        raise CacheUnavailable(f"no answer for {path!r} within {self.timeout}s")


def _version(headers: dict[str, str]) -> Version | None:
    text = headers.get("x-version")
    if not text:
        return None
    epoch, _, seq = text.partition(".")
    return int(epoch), int(seq)
