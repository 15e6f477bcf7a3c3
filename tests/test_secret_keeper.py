"""The shared cluster secret is kept: deleted or overwritten, it comes back, and a node that
joins afterwards authenticates with the running ones (issue: a deleted secret used to make
the next node generate a new one, which no running node accepted)."""

from __future__ import annotations

import time

import pytest
import trio
from cluster_helpers import RunningNode, node_config, start_node

import clusterkit
from clusterkit._core.keys import KeyLayout
from clusterkit._peers.keyring import Keyring
from clusterkit._peers.secret import shared_secret


async def _secret(client: clusterkit.EtcdClient, key: bytes) -> bytes | None:
    kv = await client.get(key)
    return kv.value if kv is not None else None


async def echo(payload: object) -> object:
    return payload


def client_config(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, *, cluster_secret: bytes | None = None
) -> clusterkit.ClientConfig:
    return clusterkit.ClientConfig(
        etcd_endpoints=list(etcd.endpoints),
        etcd_prefix=prefix.rstrip("/"),
        cluster_secret=cluster_secret,
    )


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
        # A "rotation" from a secret the cluster does not hold is not one: put back too.
        forged = Keyring(b"forged-secret-0123456789", b"not-the-cluster-secret-012345")
        forged.rotated_at, forged.window = time.time(), 600.0
        await client.put(key, forged.encode())
        await _wait_for_value(client, key, original)

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
            await client.put(layout.secret, b"kept-by-n1-0123456789")

        nursery.start_soon(restore_later)
        with trio.fail_after(5):
            got = await shared_secret(client, layout, create=True, wait_for_restore=3.0)
    assert got.current == b"kept-by-n1-0123456789"  # not a fresh secret nobody else knows


async def test_a_first_node_creates_the_secret_without_waiting(
    prefix: str, client: clusterkit.EtcdClient
) -> None:
    layout = KeyLayout(prefix)
    with trio.fail_after(1):
        made = await shared_secret(client, layout, create=True, wait_for_restore=30.0)
    assert await _secret(client, layout.secret) == made.current


async def test_a_rotation_keeps_every_handshake_working_and_ends_with_only_the_new_secret(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    key = KeyLayout(prefix).secret
    window = 3.0

    async def start(nursery: trio.Nursery, node_id: str) -> RunningNode:
        node = await start_node(nursery, node_config(node_id, etcd.endpoints, prefix))
        node.ck.peers.add_handler("test.echo", echo)
        return node

    async with trio.open_nursery() as nursery:
        n1 = await start(nursery, "n1")
        n2 = await start(nursery, "n2")
        old = await _secret(client, key)
        assert old is not None
        config = client_config(etcd, prefix)
        async with clusterkit.open_client(config) as routing:
            with trio.fail_after(5):
                while len(routing.get_nodes()) < 2:
                    await trio.sleep(0.02)
            assert await routing.call("n1", "test.echo", 1) == 1

            until = await clusterkit.rotate_cluster_secret(config, window=window)
            stored = Keyring.decode(await _secret(client, key) or b"")
            assert stored.previous == old and stored.current != old
            with trio.fail_after(5):  # every holder adopts it from its watch
                while n1.ck.peers._pool._secret != stored:
                    await trio.sleep(0.02)
            with pytest.raises(clusterkit.SecretRotationError):  # one rotation at a time
                await clusterkit.rotate_cluster_secret(config, window=window)
            for bad in (0, -1, float("inf"), float("nan")):
                with pytest.raises(clusterkit.ConfigError, match="window"):
                    await clusterkit.rotate_cluster_secret(config, window=bad)

            # First half of the window: a newcomer dials with the old secret; everyone knows it.
            n3 = await start(nursery, "n3")
            for a, b in ((n3, n1), (n1, n3), (n2, n3)):
                with trio.fail_after(10):
                    assert await a.ck.peers.request(b.ck.node, "test.echo", 3) == 3

            with trio.fail_after(window + 5):  # past the window, a keeper drops the old secret
                while Keyring.decode(await _secret(client, key) or b"").previous is not None:
                    await trio.sleep(0.05)
            settled = Keyring.decode(await _secret(client, key) or b"")
            assert settled.current == stored.current and old not in (
                await _secret(client, key) or b""
            )
            assert time.time() >= until

            # After it: a newcomer dials with the new secret; the routing client (which read the
            # secret before the rotation) reaches it, and the old secret gets nowhere.
            n4 = await start(nursery, "n4")
            with trio.fail_after(10):
                while "n4" not in {n.id for n in routing.get_nodes()}:
                    await trio.sleep(0.02)
                assert await routing.call("n4", "test.echo", 4) == 4
                assert await n4.ck.peers.request(n1.ck.node, "test.echo", 5) == 5
            stale = client_config(etcd, prefix, cluster_secret=old)
            async with clusterkit.open_client(stale) as outsider:
                with trio.fail_after(5):
                    while "n4" not in {n.id for n in outsider.get_nodes()}:
                        await trio.sleep(0.02)
                with pytest.raises(clusterkit.PeerAuthFailed):
                    await outsider.call("n4", "test.echo", 6)
        for node in (n4, n3, n2, n1):
            await node.stop()
        nursery.cancel_scope.cancel()


async def test_a_secret_an_earlier_version_kept_inside_the_prefix_is_carried_over(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    layout = KeyLayout(prefix)
    assert not layout.secret.startswith(layout.root)  # beside the prefix, not under it
    legacy = b"a" * 64  # what a node of an earlier version stored at P/secret
    await client.put(layout.legacy_secret, legacy)
    config = client_config(etcd, prefix)
    async with clusterkit.open_client(config) as early:  # before any new node: reads it
        async with trio.open_nursery() as nursery:
            n1 = await start_node(nursery, node_config("n1", etcd.endpoints, prefix))
            assert await _secret(client, layout.secret) == legacy  # copied, not regenerated

            n1.ck.peers.add_handler("test.echo", echo)
            with trio.fail_after(10):
                while not early.get_nodes():
                    await trio.sleep(0.02)
                assert await early.call("n1", "test.echo", 1) == 1
            await n1.stop()
            nursery.cancel_scope.cancel()


async def test_a_keeper_that_missed_a_whole_rotation_follows_it_and_keepers_never_fight(
    prefix: str, client: clusterkit.EtcdClient
) -> None:
    import logging

    from clusterkit._peers.secret import MAX_RESTORES, SecretKeeper

    layout = KeyLayout(prefix)
    log = logging.getLogger("clusterkit.test")
    old, new = b"old-secret-0123456789abcdef", b"new-secret-0123456789abcdef"
    settled = Keyring(new, old, rotated_at=1.0, window=1.0).settled()
    await client.put(layout.secret, settled.encode())  # rotated and settled while we were away
    behind = Keyring(old)
    async with trio.open_nursery() as nursery:
        await nursery.start(SecretKeeper(client, layout, behind, log).run)
        with trio.fail_after(5):
            while behind.current != new:
                await trio.sleep(0.02)
        assert await _secret(client, layout.secret) == settled.encode()  # not put back
        nursery.cancel_scope.cancel()

    # Two keepers holding unrelated secrets (one of them from before two rotations): each
    # restores its own a few times, then both stop writing.
    await client.delete(layout.secret)
    first = SecretKeeper(client, layout, Keyring(b"a" * 32), log)
    second = SecretKeeper(client, layout, Keyring(b"b" * 32), log)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await nursery.start(second.run)
        with trio.fail_after(10):
            while first.restored + second.restored < 2 * MAX_RESTORES - 1:
                await trio.sleep(0.05)
        before = await client.get(layout.secret)
        await trio.sleep(1.0)  # (a fight would write again within milliseconds)
        after = await client.get(layout.secret)
        assert before is not None and after is not None
        assert after.mod_revision == before.mod_revision
        assert first.restored <= MAX_RESTORES and second.restored <= MAX_RESTORES
        nursery.cancel_scope.cancel()
