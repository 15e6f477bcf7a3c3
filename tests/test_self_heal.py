"""A node's own key comes back when something else deletes or alters it while its session
lives; a lease-less node key is no member; a foreign identity written while nodes run does not
take them down."""

from __future__ import annotations

import json

import trio
from cluster_helpers import node_config, start_node

import clusterkit
from clusterkit._core.keys import KeyLayout
from clusterkit._core.records import Node, encode_node


async def _registered(client: clusterkit.EtcdClient, key: bytes, lease: int) -> bytes:
    with trio.fail_after(5):
        while True:
            kv = await client.get(key)
            if kv is not None and kv.lease == lease:
                return kv.value
            await trio.sleep(0.02)


async def test_a_deleted_or_altered_node_key_is_registered_again(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    layout = KeyLayout(prefix)
    async with trio.open_nursery() as nursery:
        n1 = await start_node(nursery, node_config("n1", etcd.endpoints, prefix))
        n2 = await start_node(nursery, node_config("n2", etcd.endpoints, prefix))
        key = layout.node("n2")
        session = n2.ck._session.value
        assert session is not None
        original = await _registered(client, key, session.lease_id)

        await client.delete(key)  # etcdctl del P/nodes/n2, lease still alive
        assert await _registered(client, key, session.lease_id) == original
        await client.put(key, b"garbage")  # lease-less garbage
        assert await _registered(client, key, session.lease_id) == original
        await client.put(key, original)  # the right bytes, but no lease: would never expire
        assert await _registered(client, key, session.lease_id) == original
        with trio.fail_after(5):  # and the others still see n2 as a member
            await n1.ck._views.wait_for(lambda v: "n2" in v.nodes)
        now = n2.ck._session.value  # the same session throughout
        assert now is not None and now.generation == session.generation
        for node in (n2, n1):
            await node.stop()
        nursery.cancel_scope.cancel()


async def test_a_lease_less_node_key_is_not_a_member(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    layout = KeyLayout(prefix)
    async with trio.open_nursery() as nursery:
        n1 = await start_node(nursery, node_config("n1", etcd.endpoints, prefix))
        await client.put(layout.node("ghost"), encode_node(Node("ghost", "127.0.0.1:1")))
        with trio.fail_after(10):
            await n1.ck.wait_converged()
        assert "ghost" not in n1.ck.view.nodes
        assert all(r.id == "n1" for rs in n1.ck.get_partition_map().values() for r in rs)
        await n1.stop()
        nursery.cancel_scope.cancel()


async def test_a_foreign_identity_written_while_nodes_run_does_not_stop_them(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    layout = KeyLayout(prefix)
    async with trio.open_nursery() as nursery:
        n1 = await start_node(nursery, node_config("n1", etcd.endpoints, prefix, session_ttl=1.0))
        identity = json.loads((await client.get(layout.cluster)).value)  # type: ignore[union-attr]
        identity["partitions"] = 8
        await client.put(layout.cluster, json.dumps(identity))
        session = n1.ck._session.value
        assert session is not None
        await client.lease_revoke(session.lease_id)  # the node must rejoin, reading it again
        with trio.fail_after(10):
            await n1.ck._session.wait_for(
                lambda s: s is not None and s.generation > session.generation
            )
        assert not n1.done.is_set()  # still running
        await n1.stop()
        nursery.cancel_scope.cancel()
