"""The routing client against a real etcd and real nodes (peer handlers over websockets).

Nodes serve ``lead``: it answers with the node's id when the node leads the key's partition,
and raises ``NotLeader`` with a hint (its view's leader) otherwise, as an app would.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from typing import Any

import pytest
import trio
from cluster_helpers import RunningNode, node_config, start_node, wait_converged
from tcp_proxy import open_proxy

import clusterkit
from clusterkit._core.keys import KeyLayout
from clusterkit._core.records import MapRecord, encode_map

P = 8


def serve_lead(node: RunningNode) -> None:
    ck = node.ck

    async def lead(key: str) -> str:
        pt = ck.get_partition(key)
        if not ck.is_leader(pt):
            leader = ck.get_leader(pt)
            hint = leader.id if leader is not None and leader.id != ck.node_id else None
            raise clusterkit.NotLeader(f"{ck.node_id} does not lead {pt}", leader=hint)
        return ck.node_id

    ck.peers.add_handler("lead", lead)


async def start_cluster(
    nursery: trio.Nursery, etcd: clusterkit.EmbeddedEtcd, prefix: str, count: int
) -> list[RunningNode]:
    """``count`` nodes serving ``lead``, converged, with a leader for every partition."""
    nodes = []
    for i in range(count):
        cfg = node_config(f"n{i}", etcd.endpoints, prefix, partitions=P, replica_factor=2)
        node = await start_node(nursery, cfg)
        serve_lead(node)
        nodes.append(node)
    await wait_converged(nodes)
    with trio.fail_after(10):
        for n in nodes:
            await n.ck._views.wait_for(lambda v: len(v.leaders) == P)
    return nodes


def client_config(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, **overrides: Any
) -> clusterkit.ClientConfig:
    settings: dict[str, Any] = {
        "etcd_endpoints": list(etcd.endpoints),
        "etcd_prefix": prefix.rstrip("/"),
        "request_timeout": 10.0,
    }
    settings.update(overrides)
    return clusterkit.ClientConfig(**settings)


def counters(client: clusterkit.RoutingClient) -> dict[str, int]:
    return client.statistics()["RoutingClient"]


def key_led_by(client: clusterkit.RoutingClient, want: Callable[[str], bool]) -> str:
    """A key whose partition's leader (in the client's view) satisfies ``want``."""
    for i in range(1000):
        leader = client.get_leader(client.get_partition(f"k{i}"))
        if leader is not None and want(leader.id):
            return f"k{i}"
    raise AssertionError("no such key")


async def test_getters_match_the_nodes(etcd: clusterkit.EmbeddedEtcd, prefix: str) -> None:
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(nursery, etcd, prefix, 3)
        async with clusterkit.open_client(client_config(etcd, prefix)) as client:
            view = await client.refresh()
            with trio.fail_after(5):
                for n in nodes:
                    await n.ck._views.wait_for(lambda v: v.revision >= view.revision)
            for n in nodes:
                assert n.ck.view.revision == client.view.revision
                assert client.get_nodes() == n.ck.get_nodes()
                for i in range(200):
                    assert client.get_partition(f"key-{i}") == n.ck.get_partition(f"key-{i}")
                assert client.get_partition(b"\xff") == n.ck.get_partition(b"\xff")
                for pt in range(P):
                    assert client.get_replicas(pt) == n.ck.get_replicas(pt)
                    assert client.get_leader(pt) == n.ck.get_leader(pt)
                    assert client.leader_epoch(pt) == n.ck.leader_epoch(pt)
            with pytest.raises(ValueError):
                client.get_replicas(P)
            with pytest.raises(ValueError):
                client.get_leader(-1)
            assert "RoutingClient client-" in repr(client)
        nursery.cancel_scope.cancel()


async def test_request_reaches_the_leader(etcd: clusterkit.EmbeddedEtcd, prefix: str) -> None:
    async with trio.open_nursery() as nursery:
        await start_cluster(nursery, etcd, prefix, 3)
        async with clusterkit.open_client(client_config(etcd, prefix)) as client:
            with trio.fail_after(10):
                await client._views.wait_for(lambda v: len(v.leaders) == P)
            for i in range(20):
                answer = await client.request(f"k{i}", "lead", f"k{i}")
                leader = client.get_leader(client.get_partition(f"k{i}"))
                assert leader is not None and answer == leader.id
            stats = counters(client)
            assert stats["requests"] == 20
            assert stats["timeouts"] == 0
            assert stats["attempts"] == 20 + stats["retries"]
        nursery.cancel_scope.cancel()


async def test_not_leader_hint_redirects_to_the_named_node(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(nursery, etcd, prefix, 3)
        for n in nodes:

            async def pinned(payload: Any, me: str = n.ck.node_id) -> str:
                if me != "n1":
                    raise clusterkit.NotLeader("ask n1", leader="n1")
                return me

            n.ck.peers.add_handler("pinned", pinned)
        async with clusterkit.open_client(client_config(etcd, prefix)) as client:
            key = key_led_by(client, lambda nid: nid != "n1")
            assert await client.request(key, "pinned", None) == "n1"
            stats = counters(client)
            assert (stats["attempts"], stats["redirects"], stats["retries"]) == (2, 1, 1)
        nursery.cancel_scope.cancel()


async def test_leadership_lost_is_retried_like_not_leader(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(nursery, etcd, prefix, 3)
        calls: list[str] = []
        for n in nodes:

            async def flaky(payload: Any, me: str = n.ck.node_id) -> str:
                calls.append(me)
                if len(calls) == 1:  # e.g. `async with ck.leadership(pt)` was cancelled
                    raise clusterkit.LeadershipLost("lost it mid-request")
                return me

            n.ck.peers.add_handler("flaky", flaky)
        async with clusterkit.open_client(client_config(etcd, prefix)) as client:
            key = key_led_by(client, lambda nid: True)
            leader = client.get_leader(client.get_partition(key))
            assert leader is not None
            assert await client.request(key, "flaky", None) == leader.id
            stats = counters(client)
            assert (stats["attempts"], stats["redirects"]) == (2, 1)
        nursery.cancel_scope.cancel()


async def test_request_in_flight_fails_over_when_the_leader_stops(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(nursery, etcd, prefix, 3)
        entered = trio.Event()
        victim: list[str] = []

        for n in nodes:

            async def hold(key: str, ck: clusterkit.ClusterKit = n.ck) -> str:
                pt = ck.get_partition(key)
                if not ck.is_leader(pt):
                    raise clusterkit.NotLeader("not me")
                if ck.node_id in victim:
                    entered.set()
                    await trio.sleep_forever()
                return ck.node_id

            n.ck.peers.add_handler("hold", hold)
        async with clusterkit.open_client(client_config(etcd, prefix)) as client:
            key = key_led_by(client, lambda nid: True)
            pt = client.get_partition(key)
            old = client.get_leader(pt)
            assert old is not None
            old_epoch = client.leader_epoch(pt)
            assert old_epoch is not None
            victim.append(old.id)
            answers: list[str] = []

            async def call() -> None:
                answers.append(await client.request(key, "hold", key, timeout=10))

            with trio.fail_after(15):
                async with trio.open_nursery() as calls:
                    calls.start_soon(call)
                    await entered.wait()
                    await next(n for n in nodes if n.ck.node_id == old.id).stop()
            # Another replica answered (the map may move the partition again afterwards).
            assert answers and answers[0] in {n.ck.node_id for n in nodes} - {old.id}
            epoch = client.leader_epoch(pt)
            assert epoch is not None and epoch > old_epoch
            stats = counters(client)
            assert stats["unreachable"] >= 1  # the in-flight call lost its connection
            assert stats["retries"] >= 1
        nursery.cancel_scope.cancel()
    gc.collect()  # a leaked socket would fail this test, not a later one


@pytest.mark.slow
async def test_a_call_to_a_frozen_leader_is_abandoned_when_the_leader_moves(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    """The leader's handler hangs (its connection stays open) and the node is then cut off
    from etcd: once the view names its successor, the client gives up on it and asks the
    successor, well within the request budget."""
    async with open_proxy(etcd.endpoints[0]) as proxy, trio.open_nursery() as nursery:
        nodes = []
        for i in range(3):
            endpoints = [proxy.endpoint] if i == 0 else list(etcd.endpoints)
            cfg = node_config(f"n{i}", endpoints, prefix, partitions=P, replica_factor=2)
            nodes.append(await start_node(nursery, cfg))
        await wait_converged(nodes)
        frozen = trio.Event()
        for n in nodes:

            async def answer(payload: Any, ck: clusterkit.ClusterKit = n.ck) -> str:
                if ck.node_id == "n0":
                    frozen.set()
                    await trio.sleep_forever()  # the call hangs on an open connection
                if not ck.is_leader(ck.get_partition(payload)):
                    raise clusterkit.NotLeader("not me")
                return ck.node_id

            n.ck.peers.add_handler("answer", answer)
        async with clusterkit.open_client(client_config(etcd, prefix)) as client:
            with trio.fail_after(10):
                await client._views.wait_for(lambda v: len(v.leaders) == P)
            key = key_led_by(client, lambda nid: nid == "n0")

            async def cut_off_when_frozen() -> None:
                await frozen.wait()
                proxy.freeze()  # n0 loses etcd: its lease expires and a successor is elected

            nursery.start_soon(cut_off_when_frozen)
            with trio.fail_after(20):
                successor = await client.request(key, "answer", key, timeout=30)
            assert successor != "n0"
            assert counters(client)["abandoned"] == 1
        proxy.thaw()
        nursery.cancel_scope.cancel()


async def test_other_remote_errors_are_raised_at_once(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        (node,) = await start_cluster(nursery, etcd, prefix, 1)

        async def broken(payload: Any) -> None:
            raise KeyError("nope")

        node.ck.peers.add_handler("broken", broken)
        async with clusterkit.open_client(client_config(etcd, prefix)) as client:
            with pytest.raises(clusterkit.RemoteError) as info:
                await client.request("k", "no-such-method", 1)
            assert info.value.remote_type == "UnknownMethod"
            with pytest.raises(clusterkit.RemoteError) as info:
                await client.request("k", "broken", 1)
            assert info.value.remote_type == "KeyError"
            stats = counters(client)
            assert (stats["attempts"], stats["retries"]) == (2, 0)
        nursery.cancel_scope.cancel()


async def test_nodes_that_keep_refusing_time_out_with_not_leader(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        (node,) = await start_cluster(nursery, etcd, prefix, 1)

        async def refuse(payload: Any) -> None:
            raise clusterkit.NotLeader("busy")

        node.ck.peers.add_handler("refuse", refuse)
        async with clusterkit.open_client(client_config(etcd, prefix)) as client:
            start = trio.current_time()
            with pytest.raises(clusterkit.NotLeader) as info:
                await client.request("k", "refuse", None, timeout=0.5)
            assert 0.5 <= trio.current_time() - start < 1.5
            assert isinstance(info.value.__cause__, clusterkit.RemoteError)
            assert "partition" in str(info.value)
            stats = counters(client)
            assert stats["timeouts"] == 1
            assert stats["redirects"] == stats["attempts"] >= 2
        nursery.cancel_scope.cancel()


async def test_a_partition_without_a_leader_times_out_with_not_leader(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    # A map naming a node that never registered, and no leader keys.
    layout = KeyLayout(prefix)
    record = MapRecord(version=1, partitions=P, replica_factor=1, replicas=(("ghost",),) * P)
    await client.put(layout.map, encode_map(record))
    for cache in (True, False):
        config = client_config(etcd, prefix, cache_enabled=cache)
        async with clusterkit.open_client(config) as routing:
            assert routing.get_leader(3) is None
            assert routing.leader_epoch(3) is None
            assert [n.id for n in routing.get_replicas(3)] == ["ghost"]
            start = trio.current_time()
            with pytest.raises(clusterkit.NotLeader, match="no live leader") as info:
                await routing.request("k", "lead", "k", timeout=0.4)
            assert 0.4 <= trio.current_time() - start < 1.0
            assert info.value.leader is None
            assert counters(routing)["attempts"] == 0
            assert counters(routing)["timeouts"] == 1


async def test_a_wrong_cluster_secret_fails_at_once(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        await start_cluster(nursery, etcd, prefix, 1)
        config = client_config(etcd, prefix, cluster_secret="not-the-cluster-secret")
        async with clusterkit.open_client(config) as client:
            with trio.fail_after(5), pytest.raises(clusterkit.PeerAuthFailed):
                await client.request("k", "lead", "k")
            assert counters(client)["attempts"] == 1
        nursery.cancel_scope.cancel()
    gc.collect()


async def test_without_a_cluster_getters_refuse_and_request_waits_for_one(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        async with clusterkit.open_client(client_config(etcd, prefix)) as client:
            assert client.get_nodes() == []
            with pytest.raises(clusterkit.ClusterNotReady):
                client.get_partition("k")
            with pytest.raises(clusterkit.ClusterNotReady):
                client.get_leader(0)
            start = trio.current_time()
            with pytest.raises(clusterkit.ClusterNotReady):
                await client.request("k", "lead", "k", timeout=0.3)
            assert 0.3 <= trio.current_time() - start < 1.0
            with pytest.raises(ValueError):
                await client.request("k", "lead", "k", timeout=0)

            answers: list[str] = []
            answered = trio.Event()

            async def call() -> None:
                answers.append(await client.request("k", "lead", "k", timeout=10))
                answered.set()

            nursery.start_soon(call)
            # The node starts after the request began: the client waits for the map and a
            # leader, and reads the cluster secret the node creates.
            await start_cluster(nursery, etcd, prefix, 1)
            with trio.fail_after(10):
                await answered.wait()
            assert answers == ["n0"]
        with pytest.raises(trio.ClosedResourceError):
            await client.request("k", "lead", "k")
        nursery.cancel_scope.cancel()


async def test_cache_disabled_reads_etcd_before_each_request(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    config = client_config(etcd, prefix, cache_enabled=False)
    async with trio.open_nursery() as nursery:
        async with clusterkit.open_client(config) as client:
            assert counters(client)["reads"] == 1
            assert "WatcherActor" not in client.statistics()
            await start_cluster(nursery, etcd, prefix, 2)
            # No watch: the getters answer from the last read until the next one.
            assert client.get_nodes() == []
            key = "some-key"
            answer = await client.request(key, "lead", key)
            leader = client.get_leader(client.get_partition(key))
            assert leader is not None and answer == leader.id
            assert [n.id for n in client.get_nodes()] == ["n0", "n1"]
            reads = counters(client)["reads"]
            await client.request(key, "lead", key)
            assert counters(client)["reads"] > reads
        nursery.cancel_scope.cancel()


async def test_a_view_stale_beyond_cache_ttl_is_reread_before_routing(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        await start_cluster(nursery, etcd, prefix, 1)
        async with open_proxy(etcd.endpoints[0]) as proxy:
            config = client_config(etcd, prefix, cache_ttl=0.2, etcd_endpoints=[proxy.endpoint])
            async with clusterkit.open_client(config) as client:
                assert await client.request("k", "lead", "k") == "n0"
                proxy.cut()
                with trio.fail_after(10):
                    await client._connected.wait_for(lambda up: not up)
                await trio.sleep(0.3)  # the view is now older than cache_ttl
                # The re-read fails (etcd is cut off): the request routes from the last view.
                with trio.fail_after(3):
                    assert await client.request("k", "lead", "k", timeout=2) == "n0"
                stats = counters(client)
                assert (stats["stale_reads"], stats["read_failures"]) == (1, 1)
                proxy.restore()
                with trio.fail_after(10):
                    await client._connected.wait_for(lambda up: up)
                assert await client.request("k", "lead", "k") == "n0"
                assert counters(client)["stale_reads"] == 1
        nursery.cancel_scope.cancel()


async def test_bad_config_and_unreachable_etcd(etcd: clusterkit.EmbeddedEtcd) -> None:
    with pytest.raises(clusterkit.ConfigError):
        clusterkit.ClientConfig(etcd_endpoints=[])
    with pytest.raises(clusterkit.ConfigError):
        clusterkit.ClientConfig(etcd_endpoints="127.0.0.1:2379")
    with pytest.raises(clusterkit.ConfigError):
        clusterkit.ClientConfig(etcd_endpoints=etcd.endpoints, cache_ttl=math.inf)
    with pytest.raises(clusterkit.ConfigError):
        clusterkit.ClientConfig(etcd_endpoints=etcd.endpoints, cluster_secret="short")
    node_cfg = clusterkit.Config(
        node_id="a", etcd_endpoints=etcd.endpoints, metrics_port=None, grpc_port=0
    )
    with pytest.raises(TypeError):
        async with clusterkit.open_client(node_cfg):  # type: ignore[arg-type]
            pass
    with trio.socket.socket() as sock:  # a loopback port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = clusterkit.ClientConfig(etcd_endpoints=[f"127.0.0.1:{port}"], dial_timeout=0.3)
    with trio.fail_after(5), pytest.raises(clusterkit.EtcdUnavailable):
        async with clusterkit.open_client(down):
            pass


async def test_the_body_exception_wins(etcd: clusterkit.EmbeddedEtcd, prefix: str) -> None:
    with pytest.raises(KeyError):
        async with clusterkit.open_client(client_config(etcd, prefix)):
            raise KeyError("mine")


@pytest.mark.parametrize("cache", [True, False])
async def test_wait_ready_until_the_cluster_forms(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, cache: bool
) -> None:
    """A client started before any node (as a demo or an app starting with its cluster) waits
    with wait_ready() instead of catching ClusterNotReady in a loop."""
    async with clusterkit.open_client(client_config(etcd, prefix, cache_enabled=cache)) as c:
        with pytest.raises(clusterkit.ClusterNotReady):
            c.get_partition("k")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_cluster, nursery, etcd, prefix, 2)
            with trio.fail_after(20):
                view = await c.wait_ready()
            assert view.map is not None and len(view.leaders) == P
            assert c.get_leader(c.get_partition("k")) is not None
            nursery.cancel_scope.cancel()


async def test_request_by_partition_reaches_that_partitions_leader(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        nodes = await start_cluster(nursery, etcd, prefix, 2)
        for node in nodes:

            async def leads(pt: int, ck: clusterkit.ClusterKit = node.ck) -> list[Any]:
                return [ck.node_id, ck.is_leader(pt)]

            node.ck.peers.add_handler("leads", leads)
        async with clusterkit.open_client(client_config(etcd, prefix)) as c:
            with trio.fail_after(10):
                for pt in range(P):
                    node_id, leads_it = await c.request(None, "leads", pt, partition=pt)
                    assert leads_it and node_id == c.get_leader(pt).id  # type: ignore[union-attr]
            with pytest.raises(ValueError, match="range"):
                await c.request(None, "leads", 0, partition=P)
            with pytest.raises(ValueError, match="one of them"):
                await c.request("k", "leads", 0, partition=0)
        nursery.cancel_scope.cancel()
