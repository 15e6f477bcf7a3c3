"""The shared cluster secret is kept: deleted or overwritten, it comes back, and a node that
joins afterwards authenticates with the running ones (issue: a deleted secret used to make
the next node generate a new one, which no running node accepted)."""

from __future__ import annotations

import trio
from cluster_helpers import node_config, start_node

import clusterkit
from clusterkit._core.keys import KeyLayout
from clusterkit._peers.secret import shared_secret


async def _secret(client: clusterkit.EtcdClient, key: bytes) -> bytes | None:
    kv = await client.get(key)
    return kv.value if kv is not None else None


async def _wait_for_value(client: clusterkit.EtcdClient, key: bytes, value: bytes) -> None:
    with trio.fail_after(5):
        while await _secret(client, key) != value:
            await trio.sleep(0.02)


async def test_a_deleted_or_overwritten_secret_is_restored_and_a_new_node_gets_in(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    key = KeyLayout(prefix).secret
    async with trio.open_nursery() as nursery:
        n1 = await start_node(nursery, node_config("n1", etcd.endpoints, prefix))
        n2 = await start_node(nursery, node_config("n2", etcd.endpoints, prefix))
        original = await _secret(client, key)
        assert original is not None

        await client.delete(key)  # etcdctl del P/secret
        await _wait_for_value(client, key, original)
        await client.put(key, b"0" * 64)  # etcdctl put P/secret <something else>
        await _wait_for_value(client, key, original)

        async def echo(payload: object) -> object:
            return payload

        for running in (n1, n2):
            running.ck.peers.add_handler("test.echo", echo)
        n3 = await start_node(nursery, node_config("n3", etcd.endpoints, prefix))
        with trio.fail_after(10):  # the newcomer authenticates with both running nodes
            for running in (n1, n2):
                assert await n3.ck.peers.request(running.ck.node, "test.echo", 7) == 7
        for node in (n3, n2, n1):
            await node.stop()
        nursery.cancel_scope.cancel()


async def test_a_joining_node_waits_for_the_secret_while_others_are_registered(
    prefix: str, client: clusterkit.EtcdClient
) -> None:
    layout = KeyLayout(prefix)
    await client.put(layout.nodes_prefix + b"n1", b"{}")  # someone is registered
    async with trio.open_nursery() as nursery:

        async def restore_later() -> None:
            await trio.sleep(0.3)
            await client.put(layout.secret, b"kept-by-n1")

        nursery.start_soon(restore_later)
        with trio.fail_after(5):
            got = await shared_secret(client, layout, create=True, wait_for_restore=3.0)
    assert got == b"kept-by-n1"  # not a fresh secret nobody else knows


async def test_a_first_node_creates_the_secret_without_waiting(
    prefix: str, client: clusterkit.EtcdClient
) -> None:
    layout = KeyLayout(prefix)
    with trio.fail_after(1):
        made = await shared_secret(client, layout, create=True, wait_for_restore=30.0)
    assert await _secret(client, layout.secret) == made
