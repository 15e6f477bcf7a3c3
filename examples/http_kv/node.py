"""The Go ClusterKit README's KV store, ported: ``python -m examples.http_kv.node --id n1
--http-port 8081 --etcd host:port``.

Theory of operation
-------------------
The Go README's example serves its own HTTP API on ``HTTPPort``: ``/set?key=&value=`` stores on
the partition's leader (a node that is not the leader answers ``307`` to
``leader.HTTPAddr()/set?...``), ``/get?key=`` reads. This port keeps that API and those
redirects, served by the app on ``http_port`` (clusterkit only advertises it as
``node.http_addr()``), and fixes what the Go sketch leaves out so that no acknowledged write is
lost when a node dies:

* the data layer is ``examples/kv_store``'s: the leader writes inside ``ck.leadership(pt)``
  (fencing epoch), replicates synchronously to every live replica over clusterkit's
  authenticated peer transport before it answers ``200``, and replicas refuse older epochs;
* a new replica pulls the partition with ``ck.migration.pull`` (the Go sketch's ``/dump``);
* ``/get`` is answered by the leader too (redirected like ``/set``), so a read after an
  acknowledged write sees it;
* a node that knows no leader for the key (during a failover) answers ``503``: retry.

``/health`` is the Go README's health handler. SIGTERM drains the node; SIGKILL is what the
test uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from urllib.parse import parse_qs, quote, urlsplit

import trio

import clusterkit
from examples.kv_store.node import KVNode, emit, node_arguments, node_config, run_node

from .http import serve_http

Response = tuple[int, list[tuple[str, str]], bytes]


class HTTPKV:
    """The HTTP API of one node (the Go example's handlers)."""

    def __init__(self, node: KVNode) -> None:
        self.node = node

    async def handle(self, method: str, target: str) -> Response:
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        ck = self.node.ck
        if parts.path == "/health":
            if not ck.is_healthy():
                return 503, [], b""
            body = {
                "status": "healthy",
                "node_id": ck.node_id,
                "partitions": len(ck.get_partition_map()),
            }
            return 200, [("content-type", "application/json")], json.dumps(body).encode()
        if parts.path not in ("/set", "/get") or "key" not in query:
            return 404, [], b"not found\n"
        key = query["key"]
        pt = ck.get_partition(key)
        if not ck.is_leader(pt):
            return self._redirect(pt, parts.path, query)
        try:
            if parts.path == "/set":
                await self.node._write(key, query.get("value", "").encode())
                return 200, [], b"OK\n"
            answer = await self.node.get({"k": key})
        except clusterkit.NotLeader:
            return self._redirect(pt, parts.path, query)
        except clusterkit.ClusterKitError as exc:  # a replica did not take the write: retry
            return 503, [("retry-after", "1")], f"{type(exc).__name__}: {exc}\n".encode()
        if not answer["found"]:
            return 404, [], b"not found\n"
        return 200, [], answer["v"]

    def _redirect(self, pt: int, path: str, query: dict[str, str]) -> Response:
        leader = self.node.ck.get_leader(pt)
        if leader is None or leader.id == self.node.node_id or not leader.http_addr():
            return 503, [("retry-after", "1")], b"no leader for this key right now\n"
        args = "&".join(f"{k}={quote(v)}" for k, v in query.items())
        return 307, [("location", f"{leader.http_addr()}{path}?{args}")], b""


async def main(args: argparse.Namespace) -> None:
    node = KVNode(args.id)
    api = HTTPKV(node)

    async def started(ck: clusterkit.ClusterKit, nursery: trio.Nursery) -> None:
        # The app serves its own HTTP API on http_port, as in the Go example.
        await nursery.start(serve_http, api.handle, "127.0.0.1", args.http_port)
        emit({"event": "up", "node": args.id, "http": ck.node.http_addr()})

    await run_node(
        node_config(node, args, http_port=args.http_port, grpc_port=args.grpc_port),
        setup=node.attach,
        parent_stdin=args.parent_stdin,
        started=started,
    )
    emit({"event": "left", "node": args.id})


def parse(argv: list[str]) -> argparse.Namespace:
    p = node_arguments(__doc__.split("\n")[0], prefix="/http-kv", partitions=16, replicas=2)
    p.add_argument("--http-port", type=int, required=True, help="the app's HTTP API")
    p.add_argument("--grpc-port", type=int, default=0, help="0: a free port")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(main, parse(sys.argv[1:]))
