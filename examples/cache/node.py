"""One node of the distributed cache: ``python -m examples.cache.node --id n1 --http-port 8081
--etcd host:port [--max-bytes N] [--warmup pull|cold]``.

Theory of operation
-------------------
clusterkit places each partition on R nodes and elects its leader; this module is the cache.

* **Writes and deletes** go to the partition's leader. Inside ``ck.leadership(pt)`` it stamps
  them ``(epoch, seq)`` (``cache.py``), applies them and sends them to every live replica —
  committed, joining, and nodes warming the partition up from it — and answers only when all
  took it. A delete is the same write with no value: that is the **invalidation**, and it
  reaches every replica before the client hears back. Replicas refuse an epoch older than
  the newest leader epoch they know, so a deposed leader cannot overwrite its successor.
* **Reads** name their consistency: ``leader`` (read-your-writes: the leader holds every
  acknowledged write, unless it expired or was evicted — a miss, never an older value) or
  ``any`` (the replica the client picked answers from its own memory: fast, and stale only in
  the window where a write is acknowledged by the leader while this replica is not yet in its
  view, e.g. right after a join).
* **TTL** per entry, given on the write; it travels as the seconds remaining.
* **Memory**: each node holds at most ``--max-bytes`` of entries (LRU eviction across all its
  partitions; ``cache.py``).
* **Warm-up**: a node given a partition pulls the entries (with their remaining TTL) from the
  previous owner through ``ck.migration.pull`` (``--warmup pull``, default), or starts empty
  (``--warmup cold``). Writes replicated to it meanwhile win over the copies it pulls.

The HTTP API (served by the app on ``http_port``, advertised as ``node.http_addr()``):
``GET /get?key=&from=leader|any``, ``GET /set?key=&value=&ttl=``, ``GET /del?key=``, ``GET
/stats``. Answers carry the entry's version in ``x-version`` (``epoch.seq``). A node asked for
a leader's work it is not doing answers ``307`` to the leader.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import msgpack
import trio

import clusterkit
from examples.http_kv.http import serve_http
from examples.kv_store.node import (
    ReplicationFailed,
    emit,
    node_arguments,
    node_config,
    run_node,
    send_to_replicas,
)

from .cache import Cache, Version

DEFAULT_TTL = 300.0
MAX_TTL = 86_400.0

Response = tuple[int, list[tuple[str, str]], bytes]


class StaleEpoch(clusterkit.ClusterKitError):
    """A write from a leader older than one this replica knows."""


class NotHeld(clusterkit.ClusterKitError):
    """This node does not hold the partition."""


class CacheNode:
    """The data layer of one cache node (no I/O of its own but ``ck``'s)."""

    def __init__(self, node_id: str, *, max_bytes: int, warmup: str = "pull") -> None:
        if warmup not in ("pull", "cold"):
            raise ValueError("warmup is 'pull' or 'cold'")
        self.node_id = node_id
        self.cache = Cache(max_bytes)
        self.warmup = warmup
        self.ready: set[int] = set()  # partitions this node serves reads of
        self.warming: dict[int, set[bytes]] = {}  # pt -> keys replicated while it warms up
        self.catchup: dict[int, dict[str, float]] = {}  # pt -> nodes warming up from us
        self.stats: Counter[str] = Counter()
        self._ck: clusterkit.ClusterKit | None = None

    @property
    def ck(self) -> clusterkit.ClusterKit:
        assert self._ck is not None
        return self._ck

    def attach(self, ck: clusterkit.ClusterKit) -> None:
        """Register the handlers and the migration source: ``open_cluster(..., setup=...)``
        runs it before any hook, so the hooks can rely on ``self.ck``."""
        self._ck = ck
        ck.peers.add_handler("cache.replicate", self.replicate)
        ck.migration.source(self.source)

    # -- hooks ---------------------------------------------------------------------------

    async def on_partition_assigned(self, pt: int, previous: clusterkit.Node | None) -> None:
        source = previous.id if previous is not None and previous.id != self.node_id else None
        if source is not None and self.warmup == "pull":
            self.warming[pt] = set()
            try:
                await self._pull(pt, source)
                leader = self.ck.get_leader(pt)
                if leader is not None and leader.id not in (source, self.node_id):
                    await self._pull(pt, leader.id)
            finally:
                self.warming.pop(pt, None)
        self.ready.add(pt)

    async def on_partition_unassigned(self, pt: int, new_owner: clusterkit.Node | None) -> None:
        self.ready.discard(pt)
        self.cache.drop(pt)
        self.catchup.pop(pt, None)

    async def _pull(self, pt: int, source: str) -> None:
        async def sink(_pt: int, entries: list[clusterkit.MigrationEntry]) -> None:
            now = trio.current_time()
            touched = self.warming.get(pt, set())
            for e in entries:
                if e.key in touched:
                    continue  # replicated to us while we warm up: newer than this copy
                value, left = msgpack.unpackb(e.value)
                self.cache.apply(pt, e.key, value, (e.epoch or 0, e.version or 0), left, now)
                self.stats["warmed"] += 1

        await self.ck.migration.pull(pt, source, sink)

    async def source(self, req: clusterkit.SourceRequest) -> Any:
        if req.partition not in self.ready:
            raise NotHeld(f"{self.node_id} is not serving partition {req.partition}")
        self.catchup.setdefault(req.partition, {})[req.requester] = trio.current_time()
        for key, item, left in self.cache.entries(req.partition, req.after, trio.current_time()):
            epoch, seq = item.version
            yield clusterkit.MigrationEntry(
                key, msgpack.packb([item.value, left]), version=seq, epoch=epoch
            )

    # -- the leader's side ---------------------------------------------------------------

    def leader_hint(self, pt: int) -> clusterkit.Node | None:
        leader = self.ck.get_leader(pt)
        return leader if leader is not None and leader.id != self.node_id else None

    async def write(self, key: bytes, value: bytes | None, ttl: float) -> Version:
        """Set (or, ``value`` None, delete) ``key`` as the leader; its version once every live
        replica has it.

        Raises:
            clusterkit.NotLeader: this node does not lead the key's partition.
            ReplicationFailed: a live replica did not take it (retry).
        """
        pt = self.ck.get_partition(key)
        try:
            async with self.ck.leadership(pt) as epoch:
                version = self.cache.stamp(pt, epoch)
                self.cache.apply(pt, key, value, version, ttl, trio.current_time())
                await self._replicate(pt, key, value, version, ttl)
        except clusterkit.LeadershipLost:
            raise clusterkit.NotLeader(f"{self.node_id} lost partition {pt}") from None
        self.stats["deletes" if value is None else "writes"] += 1
        return version

    async def _replicate(
        self, pt: int, key: bytes, value: bytes | None, version: Version, ttl: float
    ) -> None:
        message = {"p": pt, "k": key, "v": value, "e": version[0], "s": version[1], "t": ttl}
        failed = await send_to_replicas(self.ck, pt, "cache.replicate", message, self.catchup)
        if failed:
            self.stats["replication_failures"] += 1
            raise ReplicationFailed(f"partition {pt}: not replicated to {'; '.join(failed)}")

    # -- the replica's side --------------------------------------------------------------

    async def replicate(self, m: dict[str, Any]) -> bool:
        pt, key, epoch = m["p"], m["k"], m["e"]
        view = self.ck.view
        mine = view.map is not None and (
            self.node_id in view.map.replicas[pt] or self.node_id in view.map.pending.get(pt, ())
        )
        if not mine and pt not in self.cache.partitions() and pt not in self.warming:
            raise NotHeld(f"{self.node_id} is not a replica of partition {pt}")
        known = self.ck.leader_epoch(pt) or 0
        if epoch < known:
            self.stats["stale_rejected"] += 1
            raise StaleEpoch(f"partition {pt}: epoch {epoch} < {known}")
        if pt in self.warming:
            self.warming[pt].add(key)
        self.cache.apply(pt, key, m["v"], (epoch, m["s"]), m["t"], trio.current_time())
        self.stats["replicated"] += 1
        return True

    # -- reads ----------------------------------------------------------------------------

    def read(self, key: bytes) -> tuple[bytes | None, Version | None]:
        """This node's copy: ``(value, version)``, or ``(None, None)`` on a miss."""
        item = self.cache.get(self.ck.get_partition(key), key, trio.current_time())
        self.stats["hits" if item is not None else "misses"] += 1
        return (item.value, item.version) if item is not None else (None, None)

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "bytes": self.cache.bytes,
            "max_bytes": self.cache.max_bytes,
            "entries": len(self.cache),
            "evictions": self.cache.evictions,
            "expirations": self.cache.expirations,
            "partitions": len(self.ready),
            "stats": dict(self.stats),
        }


class CacheHTTP:
    """The node's HTTP API (see the module docstring)."""

    def __init__(self, node: CacheNode) -> None:
        self.node = node

    async def handle(self, method: str, target: str) -> Response:
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        node = self.node
        if parts.path == "/stats":
            return 200, [("content-type", "application/json")], json.dumps(node.describe()).encode()
        if parts.path not in ("/get", "/set", "/del") or "key" not in query:
            return 404, [], b"unknown path or no key\n"
        key = query["key"].encode()
        pt = node.ck.get_partition(key)
        if parts.path == "/get" and query.get("from", "leader") == "any":
            if pt not in node.ready:
                return self._redirect(pt, parts.path, query)
            return _answer(*node.read(key))
        if not node.ck.is_leader(pt):
            return self._redirect(pt, parts.path, query)
        if parts.path == "/get":
            return _answer(*node.read(key))
        try:
            ttl = float(query.get("ttl", DEFAULT_TTL))
        except ValueError:
            return 400, [], b"ttl must be a number of seconds\n"
        if not 0 < ttl <= MAX_TTL:
            return 400, [], f"ttl must be in (0, {MAX_TTL:.0f}]\n".encode()
        value = query.get("value", "").encode() if parts.path == "/set" else None
        try:
            version = await node.write(key, value, ttl)
        except clusterkit.NotLeader:
            return self._redirect(pt, parts.path, query)
        except clusterkit.ClusterKitError as exc:
            return 503, [("retry-after", "1")], f"{type(exc).__name__}: {exc}\n".encode()
        return 200, [("x-version", f"{version[0]}.{version[1]}")], b"OK\n"

    def _redirect(self, pt: int, path: str, query: dict[str, str]) -> Response:
        leader = self.node.leader_hint(pt)
        if leader is None or not leader.http_addr():
            return 503, [("retry-after", "1")], b"no leader for this key right now\n"
        args = "&".join(f"{k}={quote(v)}" for k, v in query.items())
        return 307, [("location", f"{leader.http_addr()}{path}?{args}")], b""


def _answer(value: bytes | None, version: Version | None) -> Response:
    if value is None or version is None:
        return 404, [], b""
    return 200, [("x-version", f"{version[0]}.{version[1]}")], value


async def main(args: argparse.Namespace) -> None:
    node = CacheNode(args.id, max_bytes=args.max_bytes, warmup=args.warmup)

    async def started(ck: clusterkit.ClusterKit, nursery: trio.Nursery) -> None:
        await nursery.start(serve_http, CacheHTTP(node).handle, "127.0.0.1", args.http_port)
        emit({"event": "up", "node": args.id, "http": ck.node.http_addr()})

    await run_node(
        node_config(node, args, http_port=args.http_port),
        setup=node.attach,
        parent_stdin=args.parent_stdin,
        started=started,
    )
    with contextlib.suppress(Exception):
        emit({"event": "left", "node": args.id, "t": time.time(), **node.describe()})


def parse(argv: list[str]) -> argparse.Namespace:
    p = node_arguments(__doc__.split("\n")[0], prefix="/cache", partitions=32, replicas=2)
    p.add_argument("--http-port", type=int, required=True, help="the node's HTTP API")
    p.add_argument("--max-bytes", type=int, default=64 << 20, help="memory bound per node")
    p.add_argument("--warmup", choices=("pull", "cold"), default="pull")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(main, parse(sys.argv[1:]))
