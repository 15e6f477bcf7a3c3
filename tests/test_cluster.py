"""open_cluster against a real etcd: convergence, minimal moves, conflicts, failover, faults."""

from __future__ import annotations

import pytest
import trio
from cluster_helpers import node_config, start_node, wait_converged
from tcp_proxy import open_proxy

import clusterkit
from clusterkit._core.assignment import balance, count_moves, minimum_moves

P, R = 64, 3


def assignment(ck: clusterkit.ClusterKit) -> dict[int, tuple[str, ...]]:
    return {pt: tuple(n.id for n in row) for pt, row in ck.get_partition_map().items()}


async def test_cold_start_join_and_leave_move_the_minimum(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        nodes = [
            await start_node(nursery, node_config(f"n{i}", etcd.endpoints, prefix))
            for i in range(3)
        ]
        await wait_converged(nodes)
        first = assignment(nodes[0].ck)
        assert all(assignment(n.ck) == first for n in nodes)
        assert all(len(set(row)) == R for row in first.values())
        assert balance(first) == (0, 1)  # 64 leaders over 3 nodes: 22/21/21

        ck = nodes[0].ck
        key = "user:42"
        pt = ck.get_partition(key)
        assert ck.get_replicas(pt)[0].id == first[pt][0]
        assert ck.is_replica(pt) == ("n0" in first[pt])
        assert [n.id for n in ck.get_nodes()] == ["n0", "n1", "n2"]
        assert ck.is_healthy()

        # A fourth node joins: replicas move only onto it, and no more than necessary.
        nodes.append(await start_node(nursery, node_config("n3", etcd.endpoints, prefix)))
        await wait_converged(nodes)
        second = assignment(nodes[0].ck)
        moved = count_moves(first, second)
        assert moved == minimum_moves(first, ["n0", "n1", "n2", "n3"], P, R)
        assert moved == 48  # 192 replicas / 4 nodes
        for pt in range(P):
            assert set(second[pt]) - set(first[pt]) <= {"n3"}
        assert balance(second)[0] <= 1 and balance(second)[1] <= 1

        # n1 leaves: only its replicas move.
        await nodes[1].stop()
        rest = [nodes[0], nodes[2], nodes[3]]
        await wait_converged(rest)
        third = assignment(nodes[0].ck)
        assert count_moves(second, third) == minimum_moves(second, ["n0", "n2", "n3"], P, R)
        for pt in range(P):
            assert set(second[pt]) - set(third[pt]) <= {"n1"}
        nursery.cancel_scope.cancel()


async def test_duplicate_node_id_is_refused_and_the_first_is_untouched(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    async with trio.open_nursery() as nursery:
        first = await start_node(nursery, node_config("dup", etcd.endpoints, prefix))
        before = await client.get(f"{prefix.rstrip('/')}/nodes/dup")
        with pytest.raises(clusterkit.NodeIdConflict, match="dup"):
            async with clusterkit.open_cluster(node_config("dup", etcd.endpoints, prefix)):
                pass  # pragma: no cover
        after = await client.get(f"{prefix.rstrip('/')}/nodes/dup")
        assert before is not None and after is not None
        assert (after.lease, after.mod_revision) == (before.lease, before.mod_revision)
        assert first.ck.is_healthy()
        nursery.cancel_scope.cancel()


async def test_other_partition_count_is_refused(etcd: clusterkit.EmbeddedEtcd, prefix: str) -> None:
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, node_config("a", etcd.endpoints, prefix))
        await wait_converged([a])
        with pytest.raises(clusterkit.ClusterMismatch, match="partitions=64"):
            async with clusterkit.open_cluster(
                node_config("b", etcd.endpoints, prefix, partitions=128)
            ):
                pass  # pragma: no cover
        nursery.cancel_scope.cancel()


async def test_coordinator_failover(etcd: clusterkit.EmbeddedEtcd, prefix: str) -> None:
    async with trio.open_nursery() as nursery:
        nodes = {
            f"c{i}": await start_node(nursery, node_config(f"c{i}", etcd.endpoints, prefix))
            for i in range(3)
        }
        await wait_converged(list(nodes.values()))
        coordinator = nodes["c0"].ck.view.coordinator
        assert coordinator is not None
        old = coordinator.node_id
        await nodes.pop(old).stop()
        with trio.fail_after(10):
            for n in nodes.values():
                await n.ck._views.wait_for(
                    lambda v: v.coordinator is not None and v.coordinator.node_id != old
                )
        # The new coordinator resumes from the stored map and covers the survivors.
        await wait_converged(list(nodes.values()))
        nursery.cancel_scope.cancel()


async def test_garbage_under_the_prefix_is_ignored(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    p = prefix.rstrip("/")
    await client.put(f"{p}/map", b"\x00not json")
    await client.put(f"{p}/nodes/ghost", "{}")
    await client.put(f"{p}/whatever", "x")
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, node_config("a", etcd.endpoints, prefix))
        b = await start_node(nursery, node_config("b", etcd.endpoints, prefix))
        await wait_converged([a, b])  # the coordinator replaced the garbage map
        await client.put(f"{p}/nodes/ghost2", b"\xff\xfe")
        await client.put(f"{p}/leaders/not-a-number", "a")
        with trio.fail_after(5):
            await a.ck._views.wait_for(
                lambda v: v.revision >= 0 and a.ck.statistics()["WatcherActor"]["garbage"] >= 4
            )
        assert [n.id for n in a.ck.get_nodes()] == ["a", "b"]
        assert a.ck.is_healthy() and b.ck.is_healthy()
        nursery.cancel_scope.cancel()


async def test_user_exception_wins_at_the_boundary(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom) as info:
        async with clusterkit.open_cluster(node_config("u", etcd.endpoints, prefix)):
            raise Boom("mine")
    assert not isinstance(info.value, BaseExceptionGroup)
    # Leaving revoked the session: the node key is gone at once.
    assert await client.get(f"{prefix.rstrip('/')}/nodes/u") is None


async def test_leave_revokes_the_session_at_once(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, node_config("a", etcd.endpoints, prefix, session_ttl=30))
        b = await start_node(nursery, node_config("b", etcd.endpoints, prefix, session_ttl=30))
        await wait_converged([a, b])
        start = trio.current_time()
        await b.ck.leave()
        assert not b.ck.is_healthy()
        with trio.fail_after(2):  # far less than the 30 s session TTL
            await a.ck._views.wait_for(lambda v: "b" not in v.nodes)
        assert trio.current_time() - start < 2
        await wait_converged([a])
        nursery.cancel_scope.cancel()


async def test_etcd_outage_routing_keeps_answering_and_the_node_rejoins(etcd_binary: str) -> None:
    async with clusterkit.open_embedded_etcd(binary=etcd_binary) as server:
        async with trio.open_nursery() as nursery:
            cfg = {"session_ttl": 1.0, "etcd_request_timeout": 0.5}
            a = await start_node(nursery, node_config("a", server.endpoints, "/o", **cfg))
            b = await start_node(nursery, node_config("b", server.endpoints, "/o", **cfg))
            await wait_converged([a, b])
            before = assignment(a.ck)
            server.member.pause()
            try:
                with trio.fail_after(10):
                    while a.ck.is_healthy():
                        await trio.sleep(0.05)
                assert assignment(a.ck) == before  # routing answers from the last view
                assert a.ck.get_replicas(0)
            finally:
                server.member.resume()
            with trio.fail_after(20):
                while not (a.ck.is_healthy() and b.ck.is_healthy()):
                    await trio.sleep(0.05)
            await wait_converged([a, b])
            assert a.ck.statistics()["MembershipActor"]["joins"] >= 2
            nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_coordinator_cut_off_from_etcd_is_replaced_within_the_session_ttl(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    ttl = 2.0
    async with open_proxy(etcd.endpoints[0]) as proxy, trio.open_nursery() as nursery:
        cut_cfg = {"session_ttl": ttl, "etcd_request_timeout": 0.5}
        first = await start_node(nursery, node_config("k0", [proxy.endpoint], prefix, **cut_cfg))
        await first.ck.wait_converged({"k0"})  # k0 is the coordinator: it was alone
        others = [
            await start_node(nursery, node_config(f"k{i}", etcd.endpoints, prefix)) for i in (1, 2)
        ]
        await wait_converged([first, *others])
        view = others[0].ck.view
        assert view.coordinator is not None and view.coordinator.node_id == "k0"
        proxy.cut()  # k0 is alive but cannot reach etcd: like a crash, for the others
        start = trio.current_time()
        with trio.fail_after(ttl + 5):
            await others[0].ck._views.wait_for(
                lambda v: v.coordinator is not None and v.coordinator.node_id != "k0"
            )
        # etcd expires k0's lease TTL (+ its 0.5 s expiry sweep) after its last keepalive.
        assert trio.current_time() - start <= ttl + 1.0
        assert not first.ck.is_healthy()
        await wait_converged(others)
        proxy.restore()
        # k0 rejoins with a new session and the map covers it again.
        await wait_converged([first, *others])
        nursery.cancel_scope.cancel()


async def test_a_failure_inside_clusterkit_is_raised_as_itself(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    from clusterkit._core.records import MapRecord, encode_map

    # The stored cluster has another partition count: joining fails inside clusterkit's
    # nursery, and the error comes out as itself, not wrapped in an ExceptionGroup.
    other = MapRecord(3, 8, 3, tuple(("x",) for _ in range(8)))
    await client.put(f"{prefix.rstrip('/')}/map", encode_map(other))
    entered = False
    with trio.fail_after(20), pytest.raises(clusterkit.ClusterMismatch) as info:
        async with clusterkit.open_cluster(node_config("m", etcd.endpoints, prefix)):
            entered = True
    assert not isinstance(info.value, BaseExceptionGroup)
    assert not entered


async def test_a_map_of_another_shape_written_while_running_is_replaced(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    """Somebody rewrites the map with another partition count while the node runs: the node
    keeps routing with its last good map, never exits, and the coordinator writes the good
    map back with a version above the foreign one."""
    from clusterkit._core.records import MapRecord, encode_map

    async with clusterkit.open_cluster(node_config("m", etcd.endpoints, prefix)) as ck:
        with trio.fail_after(20):
            await ck.wait_converged({"m"})
        good = ck.view.map
        assert good is not None
        other = MapRecord(99, 8, 3, tuple(("m",) for _ in range(8)))
        await client.put(f"{prefix.rstrip('/')}/map", encode_map(other))
        with trio.fail_after(20):
            view = await ck._views.wait_for(
                lambda v: v.map is not None and v.map.version > 99 and v.map_problem is None
            )
        assert view.map is not None and view.map.replicas == good.replicas
        assert ck.get_replicas(0)[0].id == "m" and ck.is_healthy()


async def test_a_users_exception_group_comes_back_as_it_was(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    group = ExceptionGroup("mine", [ValueError("a"), KeyError("b")])
    with pytest.raises(ExceptionGroup) as info:
        async with clusterkit.open_cluster(node_config("g", etcd.endpoints, prefix)):
            raise group
    assert info.value is group
    single = ExceptionGroup("one", [ValueError("only")])
    with pytest.raises(ExceptionGroup) as info2:
        async with clusterkit.open_cluster(node_config("g", etcd.endpoints, prefix)):
            raise single
    assert info2.value is single


async def test_a_foreign_coordinator_key_does_not_block_coordination(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    await client.put(f"{prefix.rstrip('/')}/coordinator", "")  # no lease, no node id
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, node_config("a", etcd.endpoints, prefix))
        b = await start_node(nursery, node_config("b", etcd.endpoints, prefix))
        await wait_converged([a, b])
        assert a.ck.view.coordinator is not None
        nursery.cancel_scope.cancel()
