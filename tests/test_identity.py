"""The cluster's identity (``P/cluster``): stored once at the first join, checked before every
later node registers (issue 12, item 5)."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from cluster_helpers import node_config, start_node

import clusterkit
from clusterkit._core.records import (
    HASH_FUNCTION,
    MAP_FORMAT,
    IdentityRecord,
    MapRecord,
    RecordError,
    decode_identity,
    encode_identity,
    encode_map,
)
from clusterkit.testing import open_test_cluster


def _key(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}"


def test_identity_codec_round_trips_and_refuses_garbage() -> None:
    record = IdentityRecord(64, 3)
    assert decode_identity(encode_identity(record)) == record
    assert json.loads(encode_identity(record)) == {
        "format": 1,
        "partitions": 64,
        "replica_factor": 3,
        "hash": HASH_FUNCTION,
        "map_format": MAP_FORMAT,
    }
    good = json.loads(encode_identity(record))
    for bad in (
        b"not json",
        b"[]",
        json.dumps({**good, "format": 2}).encode(),
        json.dumps({**good, "partitions": 0}).encode(),
        json.dumps({**good, "replica_factor": True}).encode(),
        json.dumps({**good, "hash": ""}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "map_format"}).encode(),
    ):
        with pytest.raises(RecordError):
            decode_identity(bad)


async def test_first_join_stores_the_identity(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    async with clusterkit.open_cluster(
        node_config("a", etcd.endpoints, prefix, partitions=32, replica_factor=2)
    ):
        kv = await client.get(_key(prefix, "cluster"))
        assert kv is not None
        assert decode_identity(kv.value) == IdentityRecord(32, 2, HASH_FUNCTION, MAP_FORMAT)
    # The identity outlives its nodes (no lease): the cluster keeps its P and R.
    kv = await client.get(_key(prefix, "cluster"))
    assert kv is not None and kv.lease == 0


async def test_other_partition_count_is_refused_before_any_map_exists(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    """The first node has not written a map yet (a long rebalance delay): a node with another
    P is still refused by open_cluster itself, and never registers."""
    async with trio.open_nursery() as nursery:
        a = await start_node(
            nursery, node_config("a", etcd.endpoints, prefix, rebalance_delay=3600)
        )
        assert await client.get(_key(prefix, "map")) is None
        entered = False
        with trio.fail_after(20), pytest.raises(clusterkit.ClusterMismatch) as info:
            async with clusterkit.open_cluster(
                node_config("b", etcd.endpoints, prefix, partitions=128)
            ):
                entered = True  # pragma: no cover
        assert not entered
        assert "partitions=64" in str(info.value) and "partitions=128" in str(info.value)
        assert await client.get(_key(prefix, "nodes/b")) is None
        assert await client.get(_key(prefix, "map")) is None
        assert a.ck.is_healthy() and set(a.ck.view.nodes) == {"a"}
        nursery.cancel_scope.cancel()


async def test_other_replica_factor_is_refused(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    async with clusterkit.open_cluster(node_config("a", etcd.endpoints, prefix)):
        pass
    with trio.fail_after(20), pytest.raises(clusterkit.ClusterMismatch, match="replica_factor=3"):
        async with clusterkit.open_cluster(
            node_config("b", etcd.endpoints, prefix, replica_factor=2)
        ):
            pass  # pragma: no cover
    assert await client.get(_key(prefix, "nodes/b")) is None


async def test_concurrent_first_joins_with_different_p_one_wins(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    """Two nodes form the cluster at once with different P: the identity is created by one
    Txn, and the other node is refused (never both registered)."""
    outcomes: dict[str, str] = {}
    both_tried = trio.Event()

    async def node(node_id: str, partitions: int) -> None:
        try:
            async with clusterkit.open_cluster(
                node_config(node_id, etcd.endpoints, prefix, partitions=partitions)
            ):
                outcomes[node_id] = "joined"
                await both_tried.wait()
        except clusterkit.ClusterMismatch:
            outcomes[node_id] = "refused"

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node, "p64", 64)
            nursery.start_soon(node, "p128", 128)
            while len(outcomes) < 2:
                await trio.sleep(0.01)
            both_tried.set()
    assert sorted(outcomes.values()) == ["joined", "refused"]
    kv = await client.get(_key(prefix, "cluster"))
    assert kv is not None
    winner = next(n for n, o in outcomes.items() if o == "joined")
    assert decode_identity(kv.value).partitions == int(winner[1:])


async def test_cluster_from_before_the_identity_key_gets_it_from_its_map(
    etcd: clusterkit.EmbeddedEtcd, prefix: str, client: clusterkit.EtcdClient
) -> None:
    """A map exists but no identity (a cluster created before this change): the identity is
    written from the stored map's P and R, so a node with another P is refused from then on
    even if the map is later garbage."""
    old = MapRecord(1, 16, 2, tuple(("gone",) for _ in range(16)))
    await client.put(_key(prefix, "map"), encode_map(old))
    with trio.fail_after(20), pytest.raises(clusterkit.ClusterMismatch, match="partitions=16"):
        async with clusterkit.open_cluster(node_config("x", etcd.endpoints, prefix)):
            pass  # pragma: no cover
    kv = await client.get(_key(prefix, "cluster"))
    assert kv is not None and decode_identity(kv.value) == IdentityRecord(16, 2)
    await client.put(_key(prefix, "map"), b"garbage")
    with trio.fail_after(20), pytest.raises(clusterkit.ClusterMismatch, match="partitions=16"):
        async with clusterkit.open_cluster(node_config("y", etcd.endpoints, prefix)):
            pass  # pragma: no cover
    async with clusterkit.open_cluster(
        node_config("z", etcd.endpoints, prefix, partitions=16, replica_factor=2)
    ) as ck:
        with trio.fail_after(20):
            await ck.wait_converged({"z"})
        assert ck.view.map is not None and ck.view.map.partitions == 16


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (b"{not json", "unreadable"),
        (
            json.dumps(
                {
                    "format": 1,
                    "partitions": 64,
                    "replica_factor": 3,
                    "hash": "xxh64",
                    "map_format": 2,
                }
            ).encode(),
            "xxh64",
        ),
        (
            json.dumps(
                {
                    "format": 1,
                    "partitions": 64,
                    "replica_factor": 3,
                    "hash": HASH_FUNCTION,
                    "map_format": 9,
                }
            ).encode(),
            "format 9",
        ),
    ],
    ids=["garbage", "other-hash", "unknown-map-format"],
)
async def test_garbage_or_foreign_identity_is_a_typed_error_at_join(
    etcd: clusterkit.EmbeddedEtcd,
    prefix: str,
    client: clusterkit.EtcdClient,
    value: bytes,
    match: str,
) -> None:
    await client.put(_key(prefix, "cluster"), value)
    with trio.fail_after(20), pytest.raises(clusterkit.ClusterMismatch, match=match) as info:
        async with clusterkit.open_cluster(node_config("g", etcd.endpoints, prefix)):
            pass  # pragma: no cover
    assert not isinstance(info.value, BaseExceptionGroup)
    assert _key(prefix, "cluster") in str(info.value) or match != "unreadable"
    assert await client.get(_key(prefix, "nodes/g")) is None
    kv = await client.get(_key(prefix, "cluster"))
    assert kv is not None and kv.value == value  # left for the operator, never overwritten


async def test_the_identity_key_is_not_garbage_to_the_view(
    etcd: clusterkit.EmbeddedEtcd, prefix: str
) -> None:
    async with clusterkit.open_cluster(node_config("v", etcd.endpoints, prefix)) as ck:
        with trio.fail_after(20):
            await ck.wait_converged({"v"})
        assert ck.statistics()["WatcherActor"]["garbage"] == 0


async def test_garbage_written_while_the_cluster_runs_never_takes_a_rejoining_node_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A member cut off beyond its session TTL rejoins: it finds garbage in P/cluster, logs
    it and rejoins anyway (the check refuses *new* nodes, never members)."""
    async with open_test_cluster(
        partitions=8, replica_factor=2, session_ttl=2.0, rebalance_delay=0.5
    ) as cluster:
        a = await cluster.start("a")
        await cluster.start("b")
        await cluster.wait_converged()
        joins = a.ck.statistics()["MembershipActor"]["joins"]
        etcd = cluster.store.client()
        await etcd.put(b"/clusterkit/cluster", b"garbage")
        a.cut()
        await a.ck._session.wait_for(lambda s: s is None)  # the session is lost
        a.restore()
        with trio.fail_after(60):
            await a.ck._session.wait_for(lambda s: s is not None)
            await a.ck._connected.wait_for(lambda connected: connected)
            await a.ck.wait_converged({"a", "b"})
        assert a.ck.statistics()["MembershipActor"]["joins"] == joins + 1
        assert a.error is None and a.ck.is_healthy()
        with pytest.raises(clusterkit.ClusterMismatch, match="unreadable"):
            await cluster.start("c")  # a new node is refused
