"""The watcher actor against a real etcd, cut off through a proxy while history is compacted."""

from __future__ import annotations

import trio
from tcp_proxy import open_proxy

import clusterkit
from clusterkit._actors.cell import Latest
from clusterkit._actors.watcher import WatcherActor
from clusterkit._core.keys import KeyLayout
from clusterkit._core.records import Node, encode_node
from clusterkit._core.view import EMPTY_VIEW, ClusterView


async def test_compaction_while_disconnected_is_recovered_without_losing_events(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    layout = KeyLayout(prefix)
    lease = (await client.lease_grant(60)).id  # node keys count only under a lease
    await client.put(layout.node("a"), encode_node(Node("a", "h")), lease=lease)
    cfg = clusterkit.Config(node_id="w", metrics_port=None, etcd_request_timeout=1.0)
    async with open_proxy(etcd.endpoints[0]) as proxy:
        async with clusterkit.open_etcd_client([proxy.endpoint]) as watched:
            views: Latest[ClusterView] = Latest(EMPTY_VIEW)
            connected = Latest(False)
            actor = WatcherActor(watched, cfg, layout, views, connected)
            async with trio.open_nursery() as nursery:
                await nursery.start(actor.run)
                assert set(views.value.nodes) == {"a"}
                proxy.cut()
                with trio.fail_after(15):
                    await connected.wait_for(lambda c: not c)
                # While the watcher is away: a leaves, b and c join, and history is compacted.
                await client.delete(layout.node("a"))
                await client.put(layout.node("b"), encode_node(Node("b", "h")), lease=lease)
                last = await client.put(layout.node("c"), encode_node(Node("c", "h")), lease=lease)
                await client.compact(last.revision)
                proxy.restore()
                with trio.fail_after(15):
                    seen = await views.wait_for(lambda v: v.revision >= last.revision)
                assert set(seen.nodes) == {"b", "c"}
                assert actor.statistics()["reloads"] == 1
                # And it follows live changes again afterwards.
                await client.delete(layout.node("b"))
                with trio.fail_after(5):
                    await views.wait_for(lambda v: set(v.nodes) == {"c"})
                nursery.cancel_scope.cancel()
